"""bench/ab.py, the side-by-side comparison of gateway variants: what a variant's spec means, that an
exported revision's code is what its gateway imports, and the arithmetic of its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from ab import Variant, export, parse_variant, report, target


def test_a_spec_is_the_code_then_its_settings() -> None:
    assert parse_variant("before=HEAD~1") == Variant("before", "HEAD~1", ())
    assert parse_variant("off=.,GATEWAY_METERING=false,X=a=b") == Variant(
        "off", None, (("GATEWAY_METERING", "false"), ("X", "a=b"))
    )


@pytest.mark.parametrize("spec", ["before", "=.", "a=", "a=.,GATEWAY_METERING", "a=.,=1", "../x=.", "a b=."])
def test_a_spec_without_its_parts_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_variant(spec)


def test_a_revisions_gateway_imports_the_revisions_code(tmp_path: Path) -> None:
    export("HEAD", tmp_path)
    variant = target(Variant("base", "HEAD", (("GATEWAY_LOG_LEVEL", "warning"),)), tmp_path)
    env = dict(variant.env)
    assert env["PYTHONPATH"] == str(tmp_path) and env["GATEWAY_LOG_LEVEL"] == "warning"
    assert variant.key == "ab-base" and variant.metering
    # Not this checkout's, which the editable install's import hook would give: the exported copy's.
    found = subprocess.run(
        [sys.executable, "-c", "import app; print(app.__file__)"],
        env={"PYTHONPATH": env["PYTHONPATH"]},
        cwd=tmp_path.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == str(tmp_path / "app" / "__init__.py")


def test_this_checkout_runs_as_it_is() -> None:
    assert target(Variant("new", None, ()), None).env == ()


def test_each_variant_is_set_against_the_first_round_by_round() -> None:
    costs = {"before": [200.0, 260.0, 220.0], "after": [190.0, 250.0, 230.0]}
    rates = {"before": [5000.0, 4000.0, 4500.0], "after": [5200.0, 4100.0, 4400.0]}
    text = report(["before", "after"], costs, rates)
    assert "over 3 rounds" in text
    assert "| before | 220.0 | 200.0, 260.0, 220.0 | 4,500 | - | - |" in text
    # Round by round -10, -10, +10: the median difference, and two rounds of three cheaper.
    assert "| after | 230.0 | 190.0, 250.0, 230.0 | 4,400 | -10.0 µs (-4.5%) | 2 of 3 |" in text
