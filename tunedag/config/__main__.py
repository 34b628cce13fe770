"""``python -m tunedag.config``: print the JSON schema of config.yaml (workflow/schemas/config.schema.json)."""
import json

from tunedag.config import json_schema

print(json.dumps(json_schema(), indent=2))
