"""The one way the gateway writes an amount of money, wherever it shows one: JSON answers, CSV, the CLI
and error messages.

A plain decimal string in USD, never an exponent (`Decimal` and float formatting give `0E-10`, `2E+1`,
`9e-06`): cents at least, and every further digit the amount has, trailing zeros trimmed. So `20.00`,
`0.00`, `0.0028`, `0.0000000002`. A string rather than a JSON number, so no client parses it into a
binary float and loses the digits a cost of 1e-10 USD has.
"""

from __future__ import annotations

from decimal import Decimal

_CENT = Decimal("0.01")


def usd(value: Decimal | int | str) -> str:
    amount = Decimal(value)
    cents = amount.quantize(_CENT)
    # A $0.0001 cap must not read $0.00, nor a cost of 20 read 20.0000000000.
    return format(cents if cents == amount else amount.normalize(), "f")
