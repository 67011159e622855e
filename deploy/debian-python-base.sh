#!/bin/sh
# A stand-in for the Dockerfile's base image (python:3.11-slim), built from Debian's own packages, for a
# machine that has a Docker engine but cannot pull from Docker Hub (a mirror of Debian's archive is all
# it needs). Then: docker build --build-arg PYTHON_IMAGE=llm-gateway-base:3.11-bookworm .
#
# What differs from the real base: Debian bookworm's Python 3.11 (3.11.2, in /usr/bin) instead of the
# official image's latest 3.11 release built into /usr/local, and the full `python3` package set (the
# official image compiles only what it needs). Trimmed as Debian's slim images are (no docs, man pages
# or locales), it is 123 MB (`docker image ls`); the official image could not be measured beside it.
#
# Usage (as root, with debootstrap and a running Docker engine): deploy/debian-python-base.sh [TAG] [MIRROR]
set -eu

tag=${1:-llm-gateway-base:3.11-bookworm}
mirror=${2:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

# python-is-python3: the Dockerfile and its HEALTHCHECK call `python`, as the official image names it.
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
# Where the network reaches PyPI through a TLS-inspecting proxy, the build stage's pip must trust what
# this host trusts; the certificates it added itself live here.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs"/usr/local/share/ca-certificates/
    chroot "$rootfs" update-ca-certificates >/dev/null
fi
tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag"
