"""Webhook targets: only public addresses, however the URL spells a private one, unless the operator allows it."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from queueformer.server.egress import AddressRefused, EgressPolicy, IPAddress, Unresolvable, refusal, resolve

# (URL, the kind of address the refusal names): every spelling of a loopback, metadata or private target.
HOSTILE = [
    ("http://127.0.0.1:6379/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://127.255.255.254/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[2002:7f00:1::1]/", "loopback"),  # 6to4 of 127.0.0.1
    ("http://localhost/", "loopback"),
    ("http://LocalHost:8080/", "loopback"),
    ("http://localhost./", "loopback"),
    ("http://api.localhost/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://0xa9fea9fe/", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of the metadata service
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25lo]/", "link-local"),
    ("http://[febf::1]/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://10.255.255.255/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://172.31.255.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd00:ec2::254]/", "private"),  # the AWS metadata service over IPv6
    ("http://100.64.0.1/", "not public"),  # carrier-grade NAT
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", ""),  # reserved (Python files it under private too)
    ("http://255.255.255.255/", ""),
    ("http://192.0.2.1/", ""),  # documentation
    ("http://198.18.0.1/", ""),  # benchmarking
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", ""),  # Teredo
]


@pytest.mark.parametrize(("url", "kind"), HOSTILE, ids=[u for u, _ in HOSTILE])
def test_every_spelling_of_a_non_public_address_is_refused(url: str, kind: str) -> None:
    with pytest.raises(AddressRefused) as exc:
        EgressPolicy().check(url)
    assert kind in exc.value.message and exc.value.param == "webhook_url"


@pytest.mark.parametrize(("url", "kind"), HOSTILE, ids=[u for u, _ in HOSTILE])
def test_literal_addresses_are_refused_at_submission_without_dns(url: str, kind: str) -> None:
    with pytest.raises(AddressRefused) as exc:
        EgressPolicy(resolver=_no_dns).check_literal(url)
    assert kind in exc.value.message


def test_public_addresses_pass_and_are_pinned() -> None:
    for url, address in [
        ("http://8.8.8.8/hook", "8.8.8.8"),
        ("https://1.1.1.1:8443/x?token=1", "1.1.1.1"),
        ("http://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
        ("http://[2002:808:808::1]/", "2002:808:808::1"),  # 6to4 of a public address
    ]:
        target = EgressPolicy().check(url)
        assert target.addresses == (ipaddress.ip_address(address),)
        assert target.port == (8443 if ":8443" in url else 80)
    assert EgressPolicy().check("https://1.1.1.1:8443/x?token=1").origin == "https://1.1.1.1:8443"


def test_a_name_that_resolves_to_a_private_address_is_refused() -> None:
    answers = {
        "hooks.example.com": ["10.0.0.7"],
        "mixed.example.com": ["93.184.215.14", "169.254.169.254"],  # one bad answer is enough
        "public.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    }
    policy = EgressPolicy(resolver=_dns(answers))
    with pytest.raises(AddressRefused, match=r"hooks\.example\.com resolves to 10\.0\.0\.7 \(private\)"):
        policy.check("https://hooks.example.com/x")
    with pytest.raises(AddressRefused, match=r"169\.254\.169\.254 \(link-local\)"):
        policy.check("https://mixed.example.com/x")
    assert len(policy.check("https://public.example.com/x").addresses) == 2
    # At submission a name is not looked up: DNS may answer differently when the webhook is sent.
    policy.check_literal("https://hooks.example.com/x")


def test_the_machines_own_names_resolve_to_refused_addresses() -> None:
    # Real resolution through the system resolver: /etc/hosts and whatever names this host.
    assert all(refusal(ip) == "loopback" for ip in resolve("localhost", 80))
    name = socket.gethostname()
    try:
        addresses = resolve(name, 80)
    except Unresolvable:
        pytest.skip(f"{name} does not resolve here")
    if any(refusal(ip) is None for ip in addresses):
        pytest.skip(f"{name} resolves to a public address here")
    with pytest.raises(AddressRefused):
        EgressPolicy().check(f"http://{name}/hook")


def test_the_allowlist_admits_named_networks_and_hosts_only() -> None:
    answers = {"hooks.internal": ["10.1.2.3"], "a.b.internal": ["10.9.9.9"], "evilinternal": ["10.0.0.1"]}
    policy = EgressPolicy.from_allowlist(["127.0.0.1/32", "fd00::/8", "hooks.internal", "*.b.internal"], _dns(answers))
    assert policy.check("http://127.0.0.1:8080/").addresses == (ipaddress.ip_address("127.0.0.1"),)
    policy.check("http://[::ffff:127.0.0.1]:8080/")  # the mapped form of an allowed address
    policy.check("http://[fd00::5]/")
    policy.check("http://HOOKS.internal./x")
    policy.check("http://a.b.internal/x")
    for url in ("http://127.0.0.2/", "http://localhost/", "http://evilinternal/", "http://169.254.169.254/"):
        with pytest.raises(AddressRefused):
            policy.check(url)
    policy.check_literal("http://127.0.0.1:9/")
    with pytest.raises(AddressRefused):
        policy.check_literal("http://[::2]/")


def test_an_unresolvable_name_is_transient() -> None:
    with pytest.raises(Unresolvable) as exc:
        EgressPolicy(resolver=_dns({})).check("https://nowhere.invalid/")
    assert exc.value.retryable


def _dns(answers: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A resolver that answers from a table, as a DNS server under someone else's control could."""

    def resolver(host: str, port: int) -> list[IPAddress]:
        name = host.rstrip(".")  # a fully qualified name, as DNS reads it
        if name not in answers:
            raise Unresolvable(f"{host} does not resolve")
        return [ipaddress.ip_address(a) for a in answers[name]]

    return resolver


def _no_dns(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"looked up {host}")
