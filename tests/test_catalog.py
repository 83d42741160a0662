"""The catalog (models.toml): the shipped file is valid, and bad files get clear errors."""

from __future__ import annotations

import datetime as dt

import pytest

from localsmall.errors import CatalogError
from localsmall.models.catalog import _catalog_text, load_catalog, parse_catalog, parse_model_ref


def test_shipped_catalog_is_valid() -> None:
    catalog = load_catalog()
    model = catalog.default
    assert model.id == "mistral-small-3.2"
    assert catalog.get("MS3.2") is model and catalog.get("mistral-small") is model
    assert model.quant("q4_k_m").remote.size == 14_333_922_848
    assert model.sampling.temperature == 0.15
    assert model.architecture.head_dim == 128 and model.architecture.n_layers == 40
    assert [q.quality for q in model.quants] == sorted(q.quality for q in model.quants)


def test_system_prompt_placeholders() -> None:
    text = load_catalog().default.system_prompt.render(dt.date(2026, 3, 1))
    assert "2026-03-01" in text and "2026-02-28" in text and "Mistral Small 3.2" in text
    assert "{today}" not in text and "{yesterday}" not in text and "{name}" not in text


def test_model_refs() -> None:
    assert parse_model_ref("mistral-small-3.2:Q5_K_M") == ("mistral-small-3.2", "Q5_K_M")
    assert parse_model_ref(":Q8_0") == (None, "Q8_0")
    assert parse_model_ref(None) == (None, None)


def test_unknown_model_and_quant() -> None:
    catalog = load_catalog()
    with pytest.raises(CatalogError, match="unknown model 'llama'"):
        catalog.get("llama")
    with pytest.raises(CatalogError, match=r"no quant 'Q1'.*Q4_K_M"):
        catalog.default.quant("Q1")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("schema = 1", "schema = 7"), "schema"),
    (lambda t: t + "\n[[[", "not valid TOML"),
    (lambda t: t.replace("size = 14333922848", 'size = "big"'), "size must be int"),
    (lambda t: t.replace("size = 14333922848", "size = -4"), "size must be positive"),
    (lambda t: t.replace('default_quant = "Q4_K_M"', 'default_quant = "Q9"'), "no quant 'Q9'"),
    (lambda t: t.replace('repo = "unsloth/Mistral-Small-3.2-24B-Instruct-2506-GGUF"\nfile = '
                         '"Mistral-Small-3.2-24B-Instruct-2506-Q2_K.gguf"',
                         'repo = "no-slash"\nfile = "x.gguf"'), "owner/name"),
    (lambda t: t.replace("default_context = 32768", "default_context = 999999"),
     "default_context"),
    (lambda t: t.replace("n_layers = 40\n", ""), "missing 'n_layers'"),
])
def test_bad_catalogs_are_rejected(edit, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(edit(_catalog_text()))
