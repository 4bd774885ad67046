"""PII masking: e-mail addresses, IPv4/IPv6 addresses and phone numbers become placeholders.

Candidates found by regex are validated (`ipaddress` for IPs, digit count for phones) so dates,
versions and ordinary numbers are left alone. Counts per kind go to the stage stats.
"""

from __future__ import annotations

import ipaddress
import re

from data_tools.config import PIIConfig
from data_tools.doc import Doc, Step

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])")

PLACEHOLDERS = {"email": "<email>", "ip": "<ip>", "phone": "<phone>"}


def _valid_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return candidate.count(":") != 2 or "::" in candidate  # "12:30:45" is a time, not an IPv6


def _valid_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    separated = candidate.startswith("+") or "(" in candidate or len(set(re.findall(r"[ .-]", candidate))) == 1
    # a date, or a timestamp that starts with one ("2004-11-29-19:50:15" stops the match at "-19")
    return 10 <= digits <= 15 and separated and not re.match(r"\d{4}[.-]\d{2}[.-]\d{2}(?!\d)", candidate)


class MaskPII(Step):
    name = "pii"

    def __init__(self, config: PIIConfig) -> None:
        super().__init__()
        self.rules = [
            (kind, pattern, check)
            for kind, pattern, check, on in (
                ("email", EMAIL, None, config.email),
                ("ip", IPV6, _valid_ip, config.ip),
                ("ip", IPV4, _valid_ip, config.ip),
                ("phone", PHONE, _valid_phone, config.phone),
            )
            if on
        ]

    def apply(self, doc: Doc) -> str | None:
        text = doc.text
        for kind, pattern, check in self.rules:

            def mask(match: re.Match, kind: str = kind, check=check) -> str:
                if check is not None and not check(match.group()):
                    return match.group()
                self.stats.events[f"masked_{kind}"] += 1
                return PLACEHOLDERS[kind]

            text = pattern.sub(mask, text)
        doc.text = text
        return None
