"""What the image relies on beyond the dependencies: an installed (not editable) gateway finds its
migrations through GATEWAY_MIGRATIONS_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _migrate(migrations: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        env={**env, "GATEWAY_MIGRATIONS_DIR": str(migrations), "GATEWAY_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrations_are_found_where_gateway_migrations_dir_says(tmp_path: Path) -> None:
    elsewhere = tmp_path / "opt" / "migrations"
    shutil.copytree(ROOT / "migrations", elsewhere, ignore=shutil.ignore_patterns("__pycache__"))
    result = _migrate(elsewhere, tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "data").glob("*.db")), "no embedded database was made"

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = _migrate(empty, tmp_path / "data2")
    assert refused.returncode != 0
    assert f"migrations not found at {empty}" in refused.stderr
