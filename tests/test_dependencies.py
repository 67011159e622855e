"""The runtime dependencies are what the gateway imports: nothing the tests or the demo alone use (the
openai SDK) is installed into a production image, and nothing it imports is left out of it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import distribution, packages_distributions
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Imported only by the tracing module, which is loaded only when traces are configured.
OPTIONAL = {"otel": ROOT / "app" / "tracing.py"}
# The embedded database's driver: SQLAlchemy loads it by the URL's name, nothing imports it.
NOT_IMPORTED = {"aiosqlite"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions(files: list[Path]) -> set[str]:
    owners = packages_distributions()
    found: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [_module(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top == "app" or top in sys.stdlib_module_names:
                    continue
                found.add(_owner(module, owners.get(top, [top])))
    return found


def _module(package: str, name: str) -> str:
    """`from package import name`: the module it loads (name itself, when it is a submodule)."""
    if package.split(".")[0] in sys.stdlib_module_names:
        return package
    try:
        return f"{package}.{name}" if find_spec(f"{package}.{name}") is not None else package
    except ModuleNotFoundError:  # `package` is a module, `name` one of its attributes
        return package


def _owner(module: str, candidates: list[str]) -> str:
    """The distribution that installed `module`; for a namespace shared by several (opentelemetry), the
    one whose files hold the module's."""
    if len(candidates) == 1:
        return _name(candidates[0])
    spec = find_spec(module)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    for candidate in candidates:
        files = distribution(candidate).files or []
        if any(Path(str(file.locate())).resolve() == origin for file in files):
            return _name(candidate)
    raise AssertionError(f"no distribution installed {module}")


def test_runtime_dependencies_are_what_app_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(requirement) for requirement in project["dependencies"]}
    optional = set(OPTIONAL.values())
    core = [path for path in (ROOT / "app").rglob("*.py") if path not in optional]
    assert _imported_distributions(core) == declared - NOT_IMPORTED
    assert "openai" not in declared
    for extra, path in OPTIONAL.items():
        wanted = {_name(requirement) for requirement in project["optional-dependencies"][extra]}
        assert _imported_distributions([path]) - declared <= wanted | {"opentelemetry-api"}


def test_the_image_installs_from_the_lock_file_with_hashes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "-r requirements.lock" in dockerfile
    assert "pip install -e" not in dockerfile and "--editable" not in dockerfile
    lock = (ROOT / "requirements.lock").read_text()
    entries = [entry for entry in re.split(r"\n(?=\S)", lock) if not entry.startswith("#")]
    pinned = {_name(entry): entry for entry in entries}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["otel"]]:
        assert _name(requirement) in pinned, f"{requirement} is not in requirements.lock: run `make lock`"
    for name, entry in pinned.items():
        assert re.match(r"[\w.\[\],-]+==\S+ \\\n", entry), f"{name} is not pinned to one version"
        assert "--hash=sha256:" in entry, f"{name} has no hash"
