"""Structured output: JSON schema, regex, choice and EBNF constraints, compiled by xgrammar.

Importing this package is cheap; the grammar library loads when the first constrained request arrives.
"""

from pagellm.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
