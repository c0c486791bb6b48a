"""Schema loading and validation: the shipped schemas load, fingerprints are stable, and every kind of mistake is a
SchemaError whose message names the field (or column)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import domaintok
from domaintok.errors import SchemaError
from domaintok.schema import SCHEMAS_DIR, load_schema, schema_from_dict, shipped_schema_names

BASE = {
    "name": "t",
    "columns": [
        {"name": "user", "type": "string"},
        {"name": "ts", "type": "timestamp"},
        {"name": "amount", "type": "float"},
    ],
    "user_id": "user",
    "event_time": "ts",
    "fields": [
        {"name": "amount", "type": "numerical_continuous", "source": "amount", "params": {"n_bins": 5}},
        {"name": "when", "type": "temporal", "source": "ts"},
    ],
}


def _with(**changes):
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        raw[key] = value
    return raw


def _field(**overrides):
    field = {"name": "f", "type": "sign", "source": "amount"}
    field.update(overrides)
    return _with(fields=[*BASE["fields"], field])


@pytest.mark.parametrize("name", ["finance", "ecommerce", "online_retail", "online_retail_compact"])
def test_shipped_schemas_load_by_name_and_path(name):
    by_name = load_schema(name)
    by_path = load_schema(SCHEMAS_DIR / f"{name}.yaml")
    assert by_name == by_path and by_name.name == name
    assert len(by_name.fingerprint) == 16 and by_name.fingerprint == by_path.fingerprint


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples").rglob("schema_*.yaml")),
                         ids=lambda p: p.name)
def test_example_schemas_load_and_keep_the_shipped_columns_and_fields(path):
    """The README's ablation schemas under examples/: each loads, with online_retail.yaml's columns and fields (the
    gap-first schema adds one: the time-since-previous token moved out of the date field)."""
    schema = load_schema(path)
    shipped = load_schema("online_retail")
    assert schema.columns == shipped.columns
    names = {f.name for f in schema.fields}
    assert names == {f.name for f in shipped.fields} | ({"gap"} if path.name == "schema_gap_first.yaml" else set())
    if path.name == "schema_gap_first.yaml":
        gap, date = schema.fields[0].typed_params(), next(f for f in schema.fields if f.name == "date").typed_params()
        assert schema.fields[0].name == "gap" and gap.parts == [] and gap.time_since_previous
        assert date.parts == next(f for f in shipped.fields if f.name == "date").typed_params().parts
        assert not date.time_since_previous


def test_bare_names_are_the_schemas_shipped_inside_the_package():
    assert shipped_schema_names() == ["ecommerce", "finance", "online_retail", "online_retail_compact"]
    assert Path(str(SCHEMAS_DIR)).parent == Path(domaintok.__file__).parent  # package data, not the checkout
    with pytest.raises(SchemaError, match=r"'no_such_schema': no such file \(known names: ecommerce, finance, online_retail, online_retail_compact\)"):
        load_schema("no_such_schema")


def test_shipped_schema_columns_are_stable():
    # the synthetic generator writes these columns: renaming one breaks it
    assert [c.name for c in load_schema("finance").columns] == [
        "user_id", "timestamp", "amount", "description", "merchant_id", "mcc", "channel"]
    assert [c.name for c in load_schema("ecommerce").columns] == [
        "user_id", "timestamp", "event_type", "price", "quantity", "category_l1", "category_l2", "product_id", "product_title"]
    retail = load_schema("online_retail")
    assert retail.column("CustomerID").aliases == ["Customer ID"] and retail.column("Price").aliases == ["UnitPrice"]
    assert {f.type for f in retail.fields} == {"sign", "numerical_continuous", "temporal", "text", "categorical_fixed",
                                               "numerical_discrete", "categorical_entity"}


def test_fingerprint_changes_with_content():
    a = schema_from_dict(BASE)
    b = schema_from_dict(_with(timezone="Europe/London"))
    assert a.fingerprint == schema_from_dict(copy.deepcopy(BASE)).fingerprint
    assert a.fingerprint != b.fingerprint


def test_defaults_and_params():
    s = schema_from_dict(BASE)
    assert s.timezone == "UTC" and s.version == 1
    assert s.fields[0].typed_params().n_bins == 5
    assert s.fields[1].typed_params().parts == ["month", "dow", "dom", "hour"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_field(type="fancy"), "field 'f': unknown field type 'fancy'"),
        (_field(source="missing_col"), "field 'f': bad source 'missing_col'"),
        (_field(source="amount * nope"), "field 'f'"),
        (_field(name="amount"), "field 'amount': duplicate field name"),
        (_field(type="numerical_continuous", params={"n_bins": 1}), "field 'f': n_bins must be in 2..1000"),
        (_field(type="numerical_continuous", params={"n_bins": "x"}), "field 'f': bad params"),
        (_field(type="temporal", source="ts", params={"parts": ["month", "week"]}), "field 'f': unknown calendar parts ['week']"),
        (_field(type="temporal", source="ts", params={"parts": []}), "field 'f': no calendar parts"),
        (_field(params={"unexpected": 1}), "field 'f': bad params"),
        (_field(type="categorical_entity", source="user", params={"buckets": 1}), "field 'f': buckets"),
        (_field(type="text", source="user", params={"max_tokens": 0}), "field 'f': max_tokens"),
        (_with(user_id="nobody"), "user_id: bad source 'nobody'"),
        (_with(filter="ghost > 1"), "filter: bad source"),
        (_with(timezone="Mars/Olympus"), "unknown timezone 'Mars/Olympus'"),
        (_with(columns=[*BASE["columns"], {"name": "amount", "type": "int"}]), "column 'amount' declared twice"),
        (_with(columns=[{"name": "user", "type": "uuid"}]), "schema"),
        (_with(fields=[]), "no fields"),
    ],
)
def test_validation_errors_name_the_culprit(raw, needle):
    with pytest.raises(SchemaError) as err:
        schema_from_dict(raw, origin="t.yaml")
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and "t.yaml" in msg


def test_missing_source_lists_declared_columns():
    with pytest.raises(SchemaError, match=r"declared columns: user, ts, amount"):
        schema_from_dict(_field(source="amt"))


def test_load_schema_errors(tmp_path):
    with pytest.raises(SchemaError, match="no such file"):
        load_schema("no_such_schema")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SchemaError, match="invalid yaml"):
        load_schema(bad)
    unknown_key = tmp_path / "k.yaml"
    unknown_key.write_text(yaml.safe_dump({**BASE, "colour": "blue"}))
    with pytest.raises(SchemaError, match="colour"):
        load_schema(unknown_key)
