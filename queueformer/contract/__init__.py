"""The contract: what every side of a queueformer cluster agrees on.

Job and result schemas, the one table of job types, errors, limits, settings, the model registry,
the OpenAI batch line formats and the broker's message units. Importable with the base dependencies
alone (pydantic, pydantic-settings, PyYAML): the SDK, the CLI, the API and the workers all build on it,
and it imports none of them.
"""

VERSION = "0.1.0"
