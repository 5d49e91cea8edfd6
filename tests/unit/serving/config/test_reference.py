"""docs/config.md is the generated reference of the config models, never stale."""

from __future__ import annotations

from pathlib import Path

from serving.config import GatewayConfig, ModelPolicy, ServerConfig
from serving.config.reference import SECTIONS, render

DOC = Path(__file__).resolve().parents[4] / "docs" / "config.md"


def test_docs_config_md_is_what_the_models_generate() -> None:
    assert DOC.read_text() == render(), (
        "docs/config.md is stale: regenerate it with `python -m serving.config.reference "
        "docs/config.md` (make docs)"
    )


def test_every_field_of_every_section_is_listed_with_its_description() -> None:
    page = render()
    for _heading, prefix, model in SECTIONS:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            assert f"| `{prefix}{name}` |" in page
    assert "| `server.http_port` | `8000` | KServe v2 HTTP port. |" in page
    assert "| `models[].artifact` | required |" in page
    assert "| `server` | see below |" in page


def test_every_config_model_reachable_from_the_top_has_a_section() -> None:
    documented = {model for _h, _p, model in SECTIONS}
    seen: set[type] = set()
    todo: list[type] = [GatewayConfig]
    while todo:
        model = todo.pop()
        seen.add(model)
        for info in model.model_fields.values():
            for arg in _types(info.annotation):
                if isinstance(arg, type) and hasattr(arg, "model_fields") and arg not in seen:
                    todo.append(arg)
    assert seen <= documented
    assert {ServerConfig, ModelPolicy} <= seen


def _types(annotation: object) -> list[object]:
    args = list(getattr(annotation, "__args__", ()))
    found = [annotation]
    for a in args:
        found += _types(a)
    return found
