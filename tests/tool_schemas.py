"""JSON schemas of the example tools that the grammar and server tests constrain replies to."""

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit"], "additionalProperties": False}
CONVERT = {"type": "object", "properties": {
    "value": {"type": "number", "minimum": -40, "maximum": 300},
    "to": {"type": "array", "items": {"enum": ["F", "K"]}, "minItems": 1, "maxItems": 2}},
    "required": ["value", "to"]}
