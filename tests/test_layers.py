"""The packages of app/ import one another in one direction: no two import each other, and every arrow goes
down LAYERS, which orders them as the data path meets them (docs/architecture.md, "Layers").

A unit is a package of app/ or a module at its top (`app.routes`, `app.live_config`); what its own modules
import from one another is its business. The imports are test_import_graph's: read from the source with
`ast`, so an import inside a function or under `if TYPE_CHECKING:` is an arrow too.
"""

from __future__ import annotations

from tests.test_import_graph import import_graph

# Top to bottom: a unit imports only units of the layers below its own.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("app.main", "app.cli"),  # the entry points
    ("app.routes",),  # the handlers, and the dependencies they are handed
    ("app.services",),  # what the lifespan makes
    ("app.batches", "app.reconcile"),  # jobs beside the request path
    ("app.live_config",),  # the policy and prices in force
    # The data path, in the order a request meets it.
    ("app.edge",),
    ("app.access",),
    ("app.ownership",),
    ("app.limits",),
    ("app.proxy",),
    ("app.metering",),
    ("app.tracing", "app.reports"),
    # Shared by the layers above.
    ("app.wire",),
    ("app.config_file",),
    ("app.errors", "app.config"),
    ("app.db",),
    ("app.call", "app.money", "app.logs"),
)


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def unit_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """The arrows between units, from the arrows between their modules. The package `app` itself holds no
    code (app.db.migrate imports it for its path), so it is no unit."""
    units = {name: unit(name) for name in modules if name != "app"}
    graph: dict[str, set[str]] = {name: set() for name in units.values()}
    for name, targets in modules.items():
        if name in units:
            graph[units[name]].update(units[t] for t in targets if t in units and units[t] != units[name])
    return graph


def two_way(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} <-> {b}" for a, targets in graph.items() for b in targets if a < b and a in graph[b])


def upward(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """The arrows that do not go down `layers`: to the importer's own layer or one above it."""
    rank = {name: depth for depth, layer in enumerate(layers) for name in layer}
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if rank[b] <= rank[a])


def test_the_units_and_their_arrows_are_read() -> None:
    graph = unit_graph(
        {"app": {"app.x"}, "app.x.a": {"app.x.b", "app.y"}, "app.x.b": set(), "app.y": {"app.x.b"}}
    )
    assert graph == {"app.x": {"app.y"}, "app.y": {"app.x"}}
    assert two_way(graph) == ["app.x <-> app.y"]
    assert upward(graph, (("app.x",), ("app.y",))) == ["app.y -> app.x"]
    assert upward({"app.x": {"app.y"}, "app.y": set()}, (("app.x", "app.y"),)) == ["app.x -> app.y"]
    assert "app.call" in unit_graph(import_graph())["app.limits"]


def test_no_two_packages_import_each_other() -> None:
    pairs = two_way(unit_graph(import_graph()))
    assert not pairs, "packages importing each other: " + "; ".join(pairs)


def test_every_unit_has_a_layer() -> None:
    layered = [name for layer in LAYERS for name in layer]
    assert len(layered) == len(set(layered))
    assert set(unit_graph(import_graph())) == set(layered)


def test_the_arrows_go_down_the_layers() -> None:
    against = upward(unit_graph(import_graph()), LAYERS)
    assert not against, "imports against the layers: " + "; ".join(against)
