"""The JSON Schema exported from the models (`oob schema`, schemas/oobspec.schema.json), with
servers chosen by their `protocol` so editors name the wrong field."""
from __future__ import annotations

from typing import Any, get_args

from pydantic import Tag

from .models import Server, ServerBase, Spec, _protocol_of


def _server_variants() -> dict[str, type[ServerBase]]:
    """protocol -> model, read from the tags of the `Server` union."""
    union = get_args(Server)[0]
    variants = {}
    for member in get_args(union):
        model, *extras = get_args(member)
        (tag,) = [e for e in extras if isinstance(e, Tag)]
        variants[tag.tag] = model
    return variants


def _dispatch_servers(node: Any, variants: dict[str, type[ServerBase]]) -> None:
    """Replace pydantic's `oneOf` of the server models by a choice on `protocol`.

    A `oneOf` makes validators (jsonschema, yaml-language-server) report an error inside a server
    as "not valid under any of the given schemas"; choosing the variant by `protocol` (absent:
    the discriminator's default) lets them name the field that is wrong.
    """
    refs = [{"$ref": f"#/$defs/{model.__name__}"} for model in variants.values()]
    if isinstance(node, list):
        for item in node:
            _dispatch_servers(item, variants)
        return
    if not isinstance(node, dict):
        return
    if node.get("oneOf") == refs:
        default = _protocol_of({})
        del node["oneOf"]
        node["properties"] = {"protocol": {
            "enum": list(variants), "default": default,
            "description": f"Server kind; it decides which other fields apply ({default} when absent)."}}
        # Absent, `protocol` means the default; any other variant needs it written (in an object).
        named = {"type": "object", "required": ["protocol"]}
        node["allOf"] = [{"if": {"properties": {"protocol": {"const": tag}}, **({} if tag == default else named)},
                          "then": ref} for tag, ref in zip(variants, refs)]
    for value in node.values():
        _dispatch_servers(value, variants)


def json_schema() -> dict:
    schema = Spec.model_json_schema(by_alias=True)
    _dispatch_servers(schema, _server_variants())
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "oobspec"
    return schema
