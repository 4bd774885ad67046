"""PII masking: e-mail addresses, IPv4/IPv6 addresses and phone numbers become placeholders and
are counted; dates, times, versions, years and ordinary numbers are left alone."""

from __future__ import annotations

import ipaddress
import re

import pytest

from data_tools.config import PIIConfig
from data_tools.doc import Doc
from data_tools.pii import MaskPII


def mask(text, config=None):
    step = MaskPII(config or PIIConfig())
    (doc,) = step([Doc(id="d", source="test", text=text)])
    return doc.text, dict(step.stats.events)


MASKED = [
    # sentences from the iana and handbook pages of the sample corpora
    ("Contributions may be emailed to tz@iana.org.", "Contributions may be emailed to <email>.", "email"),
    ("Maintainer: Raphael Hertzog <hertzog@debian.org>", "Maintainer: Raphael Hertzog <<email>>", "email"),
    ("mail_to = admin@falcot.com", "mail_to = <email>", "email"),
    ("a.root-servers.net 198.41.0.4, VeriSign, Inc.", "a.root-servers.net <ip>, VeriSign, Inc.", "ip"),
    ("“dotted decimal” notation (for example, 192.0.2.53).", "“dotted decimal” notation (for example, <ip>).", "ip"),
    ("sshd[430]: Server listening on 0.0.0.0 port 22.", "sshd[430]: Server listening on <ip> port 22.", "ip"),
    ("198.41.0.4, 2001:503:ba3e::2:30", "<ip>, <ip>", "ip"),
    ("(for example, 2001:0db8:582:ae33::29).", "(for example, <ip>).", "ip"),
    ("address 2001:db8:1234:5::1:1/64", "address <ip>/64", "ip"),
    ("Server listening on :: port 22.", "Server listening on <ip> port 22.", "ip"),
    ("ICANN, phone +1 310 301 5800.", "ICANN, phone <phone>.", "phone"),
    ("Call (310) 301-5800 today.", "Call <phone> today.", "phone"),
    ("Call 310-301-5800 today.", "Call <phone> today.", "phone"),
    ("Telephone: +44 20 7946 0958", "Telephone: <phone>", "phone"),
    ("Appelez le 01 23 45 67 89 demain.", "Appelez le <phone> demain.", "phone"),
]


@pytest.mark.parametrize("text, expected, kind", MASKED)
def test_pii_is_masked_and_counted(text, expected, kind):
    """Each address or number becomes its placeholder and is counted under masked_<kind>."""
    masked, events = mask(text)
    assert masked == expected
    assert events == {f"masked_{kind}": expected.count(f"<{kind}>")}


LEFT_ALONE = [
    "The crawl was made on 2014-01-27 and again on 27.01.2014.",
    "Your cert will expire on 2022-06-04. To obtain a new or tweaked version, run certbot again.",
    "The job started at 12:30:45 and ended at 23:59:59.",
    "Certificate is to be certified until May 27 15:26:29 2024 GMT (825 days)",
    "** 2004-11-29-19:50:15: DCC CHAT attempt authorized from GAB",
    "Kernel 2.6.32, Python 3.11.4 and the version string 1.2.3.4.5 are versions.",
    "debian-handbook 11.20220922 is packaged for Debian 12.",
    "Revisions date from 2003-03-17 to 2016-05-01; IPv4 was deployed on 1 January 1983.",
    "0-127: Standards Action. 128-254: Specification Required. 1024-1999: Expert Review.",
    "They are configured as 13 named authorities, with 1,234,567 queries and 3.14159 ratios.",
    "up /sbin/wondershaper eth0 500 100",
    "Years 1990, 1995 and 2000 saw 12 releases; RFC 5771 and RFC 2606 apply.",
]


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_non_pii_numbers_left_alone(text):
    """Dates, times, timestamps, versions, years, ranges and ordinary numbers are not masked."""
    assert mask(text) == (text, {})


def test_masks_every_address_of_real_page(corpora):
    """On the iana root-servers page every IPv4/IPv6 address is masked (as counted independently
    with `ipaddress`) and no address remains; the rest of the text is untouched."""
    from data_tools.config import ExtractConfig
    from data_tools.extract import ExtractText
    from data_tools.readers.warc import read_warc
    from data_tools.stats import StageStats

    docs = ExtractText(ExtractConfig())(read_warc(corpora / "iana.warc.gz", StageStats(), [].append))
    text = next(d.text for d in docs if d.url == "http://www.iana.org/domains/root/servers")

    def is_ip(token):
        try:
            ipaddress.ip_address(token)
        except ValueError:
            return False
        return True

    addresses = [t for t in re.split(r"[\s,]+", text) if is_ip(t)]
    masked, events = mask(text)
    assert len(addresses) >= 20 and events == {"masked_ip": len(addresses)}
    assert not [t for t in re.split(r"[\s,]+", masked) if is_ip(t)]
    assert masked.count("<ip>") == len(addresses) and "a.root-servers.net" in masked


@pytest.mark.parametrize("kind", ["email", "ip", "phone"])
def test_each_kind_can_be_switched_off(kind):
    """With one kind disabled its values stay and the other kinds are still masked."""
    text = "Write to tz@iana.org from 192.0.2.53 or call +1 310 301 5800."
    masked, events = mask(text, PIIConfig(**{kind: False}))
    others = {"email", "ip", "phone"} - {kind}
    assert f"<{kind}>" not in masked and all(f"<{k}>" in masked for k in others)
    assert set(events) == {f"masked_{k}" for k in others}
