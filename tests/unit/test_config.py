"""Network config parsing, defaults and validation (reference §3, flannel's config_test.go)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannel import errors
from flannel.config import parse_network_config


def test_defaults_lowercase_key():
    c = parse_network_config('{ "network": "10.3.0.0/16" }')
    assert c.network == IPv4Network("10.3.0.0/16")
    assert (c.subnet_len, c.subnet_min, c.subnet_max) == (24, IPv4Address("10.3.1.0"), IPv4Address("10.3.255.0"))
    assert c.backend_type == "udp"  # flannel's code default when Backend is absent
    assert c.subnet_count == 255
    assert not c.enable_ipv6 and c.enable_ipv4 and not c.enable_nftables


def test_ipv6_defaults():
    c = parse_network_config('{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }')
    assert c.ipv6_network == IPv6Network("fc00::/48")
    assert c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == IPv6Address("fc00:0:0:1::")
    assert c.ipv6_subnet_max == IPv6Address("fc00:0:0:ffff::")
    assert c.network is None and not c.enable_ipv4


def test_overrides_preserved():
    c = parse_network_config('{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.8.0","SubnetLen":28}')
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (28, "10.3.5.0", "10.3.8.0")
    c6 = parse_network_config('{"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::",'
                              '"IPv6SubnetMax":"fc00:0:0:f::","IPv6SubnetLen":124,"Network":"10.0.0.0/8"}')
    assert (c6.ipv6_subnet_len, str(c6.ipv6_subnet_min), str(c6.ipv6_subnet_max)) == (
        124, "fc00:0:0:1::", "fc00:0:0:f::")


@pytest.mark.parametrize("net,length,smin,smax", [
    ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
    ("10.1.0.0/22", 24, "10.1.1.0", "10.1.3.0"),
    ("10.1.0.0/23", 25, "10.1.0.128", "10.1.1.128"),
    ("10.1.0.0/28", 30, "10.1.0.4", "10.1.0.12"),
    ("10.1.2.3/16", 24, "10.1.1.0", "10.1.255.0"),  # host bits are masked like Go's ParseCIDR
])
def test_subnet_len_defaulting(net, length, smin, smax):
    c = parse_network_config(f'{{"Network":"{net}"}}')
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (length, smin, smax)


def test_backend_type_case_and_raw_passthrough():
    c = parse_network_config('{"Network":"10.1.0.0/16","Backend":{"Type":"VXLAN","VNI":4}}')
    assert c.backend_type == "vxlan"
    assert c.backend == {"Type": "VXLAN", "VNI": 4}


def test_duplicate_keys_last_wins():
    c = parse_network_config('{"Network":"10.1.0.0/16","network":"10.2.0.0/16"}')
    assert c.network == IPv4Network("10.2.0.0/16")


def test_compatibility_check():
    c = parse_network_config('{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.25.0"}')
    assert c.is_compatible(IPv4Network("10.3.5.0/24"), None)
    assert not c.is_compatible(IPv4Network("10.3.30.0/24"), None)
    assert not c.is_compatible(IPv4Network("10.3.5.0/25"), None)
    assert not c.is_compatible(IPv4Network("10.3.5.0/24"), IPv6Network("fc00::/64"))


BAD_CONFIGS = [
    ("", "not valid JSON"),
    ("[1,2]", "must be a JSON object"),
    ("{}", "Network: is missing"),
    ('{"Network":"10.0.0.0/33"}', "Network: '10.0.0.0/33' is not a valid CIDR"),
    ('{"Network":"fc00::/48"}', "Network: 'fc00::/48' is not an IPv4 CIDR"),
    ('{"Network":16}', "Network: must be a CIDR string"),
    ('{"Network":"10.0.0.0/16","SubnetLen":31}', "SubnetLen must be less than /31"),
    ('{"Network":"10.0.0.0/16","SubnetLen":17}', "network must be able to accommodate at least four subnets"),
    ('{"Network":"10.0.0.0/16","SubnetLen":"24"}', "SubnetLen: must be a non-negative integer"),
    ('{"Network":"10.0.0.0/16","SubnetLen":-1}', "SubnetLen: must be a non-negative integer"),
    ('{"Network":"10.0.0.0/29"}', "Minimum useful network prefix is /28"),
    ('{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}', "SubnetMin is not in the range of the Network"),
    ('{"Network":"10.0.0.0/16","SubnetMax":"11.0.0.0"}', "SubnetMax is not in the range of the Network"),
    ('{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.5"}', "SubnetMin is not on a SubnetLen boundary: 10.0.1.5"),
    ('{"Network":"10.0.0.0/16","SubnetMax":"10.0.9.1"}', "SubnetMax is not on a SubnetLen boundary"),
    ('{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.2.0"}',
     "SubnetMin 10.0.9.0 is greater than SubnetMax"),
    ('{"Network":"10.0.0.0/16","SubnetMin":"banana"}', "SubnetMin: 'banana' is not an IPv4 address"),
    ('{"Network":"10.0.0.0/16","EnableIPv6":"yes"}', "EnableIPv6: must be true or false"),
    ('{"Network":"10.0.0.0/16","EnableIPv6":true}', "IPv6Network: is missing"),
    ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/125"}', "IPv6Network is too small"),
    ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}',
     "SubnetLen must be less than /127"),
    ('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fd00::"}',
     "IPv6SubnetMin is not in the range"),
    ('{"EnableIPv4":false,"EnableIPv6":false}', "at least one address family must be enabled"),
    ('{"Network":"10.0.0.0/16","Backend":"vxlan"}', "Backend: must be a JSON object"),
    ('{"Network":"10.0.0.0/16","Backend":{"VNI":1}}', "Backend.Type: is missing"),
    ('{"Network":"10.0.0.0/16","Backend":{"Type":7}}', 'Backend.Type: must be a string like "vxlan", got 7'),
    ('{"Network":"10.0.0.0/16","Backend":{"Type":["vxlan"]}}', 'Backend.Type: must be a string like "vxlan", got'),
    ('{"Network":"10.0.0.0/16","EnableIPv4":"true"}', 'EnableIPv4: must be true or false, got "true"'),
    ('{"Network":["10.0.0.0/16"]}', "Network: must be a CIDR string like 10.244.0.0/16"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"Network":' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
]


@pytest.mark.parametrize("text,message", BAD_CONFIGS)
def test_invalid_configs_name_field_and_rule(text, message):
    with pytest.raises(errors.ConfigError) as info:
        parse_network_config(text, source="/coreos.com/network/config")
    assert message in str(info.value)


def test_fuzz_parse_never_crashes():
    import random
    rnd = random.Random(7)
    pieces = ['{', '}', '"Network"', '"SubnetLen"', '"SubnetMin"', '"Backend"', '"Type"', ':', ',', '"10.0.0.0/16"',
              '24', '-3', 'true', 'null', '"fc00::/48"', '"EnableIPv6"', '"IPv6Network"', '[', ']', '"x"']
    for _ in range(3000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12)))
        try:
            parse_network_config(text)
        except errors.ConfigError:
            pass


def test_restart_changes_name_what_a_running_agent_cannot_apply():
    from flannel.config import deferred_changes, restart_changes
    base = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    assert restart_changes(base, base) == [] and deferred_changes(base, base) == []
    moved = parse_network_config('{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}')
    assert restart_changes(base, moved) == ["Network 10.5.0.0/16 → 10.6.0.0/16"]
    other = parse_network_config('{"Network":"10.5.0.0/16","SubnetLen":25,"Backend":{"Type":"host-gw"}}')
    assert restart_changes(base, other) == ["SubnetLen 24 → 25", "Backend.Type vxlan → host-gw"]
    ranged = parse_network_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0",'
                                  '"Backend":{"Type":"vxlan","VNI":2}}')
    assert restart_changes(base, ranged) == []
    assert deferred_changes(base, ranged) == ["SubnetMin 10.5.1.0 → 10.5.10.0", "Backend options"]
    same_case = parse_network_config('{"network":"10.5.0.0/16","backend":{"type":"VXLAN"}}')
    assert restart_changes(base, same_case) == [] and deferred_changes(base, same_case) == []
