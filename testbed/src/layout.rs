//! Names and addresses of everything a testbed creates, derived from its name alone.
//!
//! Deriving every name from the testbed's name (through a short stable hash) is what lets
//! `down` find the remains of a crashed `up` even when its state file is gone, and what keeps
//! two testbeds with different names from ever touching each other's interfaces.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::bail;

/// The prefix of every interface, namespace and machine name the testbed creates. It is short
/// because Linux interface names are limited to 15 bytes.
pub const PREFIX: &str = "flt";

/// The most nodes one testbed may have: node addresses are `.11` to `.10 + N` of a /24.
pub const MAX_NODES: u32 = 64;

/// A validated testbed name: lowercase ASCII letters, digits and `-`, starting with a letter or
/// digit, at most 48 bytes. It names a directory and appears in ssh host aliases, so nothing
/// else is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestbedName(String);

impl TestbedName {
    pub fn new(name: &str) -> anyhow::Result<TestbedName> {
        let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if name.is_empty() || name.len() > 48 {
            bail!("testbed name {name:?}: must be 1 to 48 characters long");
        }
        if name.starts_with('-') || !name.chars().all(valid_char) {
            bail!(
                "testbed name {name:?}: use lowercase letters, digits and '-', not starting with '-'"
            );
        }
        Ok(TestbedName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TestbedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything a testbed of a given name and size is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub name: TestbedName,
    /// Six hex digits identifying the testbed in every system-wide name.
    pub tag: String,
    pub bridge: String,
    pub bridge_v4: Ipv4Addr,
    pub bridge_v6: Ipv6Addr,
    pub nodes: Vec<NodeLayout>,
}

/// One node: its names and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// The node's hostname and ssh alias, `node1` to `nodeN`.
    pub name: String,
    pub netns: String,
    /// The host end of the node's veth pair; the other end is `eth0` inside the namespace.
    pub veth: String,
    /// The systemd-nspawn machine name, unique on this machine.
    pub machine: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Layout {
    pub fn new(name: &TestbedName, nodes: u32) -> anyhow::Result<Layout> {
        if nodes == 0 || nodes > MAX_NODES {
            bail!("testbed {name}: --nodes must be between 1 and {MAX_NODES}, not {nodes}");
        }
        let hash = fnv1a64(name.as_str().as_bytes());
        let tag = format!("{:06x}", hash & 0xff_ffff);
        let (v4, v6) = subnets(hash);
        let nodes = (1..=nodes)
            .map(|i| NodeLayout {
                name: format!("node{i}"),
                netns: format!("{PREFIX}-{tag}-{i}"),
                veth: format!("{PREFIX}{tag}v{i}"),
                machine: format!("{PREFIX}-{tag}-node{i}"),
                ipv4: host_v4(v4, 10 + i),
                ipv6: host_v6(v6, 10 + i),
            })
            .collect();
        Ok(Layout {
            name: name.clone(),
            bridge: format!("{PREFIX}-{tag}"),
            bridge_v4: host_v4(v4, 1),
            bridge_v6: host_v6(v6, 1),
            tag,
            nodes,
        })
    }

    /// The IPv4 network of the testbed, as a (network address, prefix length) pair.
    pub fn net_v4(&self) -> (Ipv4Addr, u8) {
        let [a, b, c, _] = self.bridge_v4.octets();
        (Ipv4Addr::new(a, b, c, 0), 24)
    }

    /// The IPv6 unique-local network of the testbed.
    pub fn net_v6(&self) -> (Ipv6Addr, u8) {
        let s = self.bridge_v6.segments();
        (Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0), 64)
    }

    pub fn node(&self, name: &str) -> Option<&NodeLayout> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Whether an interface or namespace name was made by a testbed with this tag, or by any
/// testbed when `tag` is `None`. Used by `down` to find leftovers without a state file.
pub fn is_ours(system_name: &str, tag: Option<&str>) -> bool {
    let Some(rest) = system_name.strip_prefix(PREFIX) else { return false };
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    if rest.len() < 6 || !rest.is_char_boundary(6) {
        return false;
    }
    let (found_tag, suffix) = rest.split_at(6);
    if !found_tag.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return false;
    }
    if tag.is_some_and(|tag| tag != found_tag) {
        return false;
    }
    // The bridge has no suffix, veths end in `v<i>`, namespaces in `-<i>`.
    let index = suffix.strip_prefix('v').or_else(|| suffix.strip_prefix('-'));
    match index {
        None => suffix.is_empty(),
        Some(index) => !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Finds the first route in `ip route show` output whose destination overlaps `net`. The
/// default route is ignored: it overlaps everything and is no clash.
pub fn clashing_route(routes: &str, net: (u128, u8), v6: bool) -> Option<String> {
    routes.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let mut dest = words.next()?;
        if matches!(dest, "unicast" | "unreachable" | "blackhole" | "prohibit" | "throw") {
            dest = words.next()?;
        }
        if dest == "default" {
            return None;
        }
        let (addr, len) = dest.split_once('/').unwrap_or((dest, if v6 { "128" } else { "32" }));
        let len: u8 = len.parse().ok()?;
        let addr = if v6 {
            u128::from(addr.parse::<Ipv6Addr>().ok()?)
        } else {
            u128::from(u32::from(addr.parse::<Ipv4Addr>().ok()?))
        };
        let bits = if v6 { 128 } else { 32 };
        let overlap = overlaps((addr, len), net, bits);
        overlap.then(|| line.trim().to_owned())
    })
}

fn overlaps(a: (u128, u8), b: (u128, u8), bits: u8) -> bool {
    let shorter = a.1.min(b.1);
    let mask = |len: u8| if len == 0 { 0 } else { u128::MAX << (bits - len.min(bits)) };
    let m = mask(shorter) & if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    (a.0 & m) == (b.0 & m)
}

/// FNV-1a, 64 bits: tiny, and stable across toolchains (unlike `DefaultHasher`), which matters
/// because the names it produces must be found again by a later build of this tool.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The /24 inside 10.200.0.0 to 10.249.255.255 and the ULA /64 of a testbed. Ranges high in
/// 10/8 are chosen because home and office networks mostly use its low end.
fn subnets(hash: u64) -> ([u8; 3], [u16; 4]) {
    let v4 = [10, 200 + ((hash >> 24) % 50) as u8, (hash >> 32) as u8];
    let global_id = (hash >> 8) & 0xff_ffff_ffff;
    let v6 =
        [0xfd00 | ((global_id >> 32) as u16 & 0xff), (global_id >> 16) as u16, global_id as u16, 0];
    (v4, v6)
}

fn host_v4(net: [u8; 3], host: u32) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host as u8)
}

fn host_v6(net: [u16; 4], host: u32) -> Ipv6Addr {
    Ipv6Addr::new(net[0], net[1], net[2], net[3], 0, 0, 0, host as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(name: &str, nodes: u32) -> Layout {
        Layout::new(&TestbedName::new(name).unwrap(), nodes).unwrap()
    }

    #[test]
    fn names_fit_interface_limits_and_carry_the_prefix() {
        let l = layout("a-rather-long-testbed-name-used-by-some-test-42", MAX_NODES);
        assert!(l.bridge.len() <= 15, "{}", l.bridge);
        for node in &l.nodes {
            assert!(node.veth.len() <= 15, "{}", node.veth);
            assert!(node.veth.starts_with(PREFIX) && node.netns.starts_with(PREFIX));
            assert!(is_ours(&node.veth, Some(&l.tag)));
            assert!(is_ours(&node.netns, Some(&l.tag)));
        }
        assert!(is_ours(&l.bridge, Some(&l.tag)));
        assert_eq!(l.nodes[2].name, "node3");
        assert_eq!(l.nodes[2].veth, format!("flt{}v3", l.tag));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in ["eth0", "flt", "fltzzzzzzv1", "flt-abcdef-x", "flt-abcdefv", "docker0"] {
            assert!(!is_ours(name, None), "{name}");
        }
        assert!(is_ours("flt-abcdef", None));
        assert!(!is_ours("flt-abcdef", Some("123456")));
    }

    #[test]
    fn names_and_subnets_are_stable_and_differ_between_testbeds() {
        let a = layout("alpha", 3);
        assert_eq!(a, layout("alpha", 3));
        let b = layout("beta", 3);
        assert_ne!(a.tag, b.tag);
        assert_ne!(a.net_v4(), b.net_v4());
        assert_ne!(a.net_v6(), b.net_v6());
        // The hash is fixed forever (a change would orphan existing testbeds): these are the
        // published FNV-1a test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn addresses_are_in_private_ranges() {
        for name in ["default", "x", "test-9f3a", "ci"] {
            let l = layout(name, 5);
            let (net, len) = l.net_v4();
            assert!(net.is_private() && len == 24, "{net}");
            assert_eq!(net.octets()[0], 10);
            assert!((200..250).contains(&net.octets()[1]));
            assert_eq!(l.bridge_v6.segments()[0] >> 8, 0xfd);
            assert_eq!(l.nodes[0].ipv4.octets()[3], 11);
            assert_eq!(l.nodes[4].ipv6.segments()[7], 15);
        }
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        for name in ["", "Upper", "-x", "a b", "a/b", &"x".repeat(49)] {
            assert!(TestbedName::new(name).is_err(), "{name:?}");
        }
        let name = TestbedName::new("ok").unwrap();
        assert!(Layout::new(&name, 0).is_err());
        assert!(Layout::new(&name, MAX_NODES + 1).is_err());
    }

    #[test]
    fn route_clashes_are_found() {
        let routes = "default via 192.168.1.1 dev eth0\n\
                      10.0.0.0/8 dev wg0 scope link\n\
                      192.168.1.0/24 dev eth0 proto kernel scope link src 192.168.1.5\n";
        let v4 = |a: [u8; 4], len| (u128::from(u32::from(Ipv4Addr::from(a))), len);
        assert_eq!(
            clashing_route(routes, v4([10, 213, 7, 0], 24), false).as_deref(),
            Some("10.0.0.0/8 dev wg0 scope link")
        );
        assert!(clashing_route(routes, v4([172, 16, 0, 0], 24), false).is_none());
        assert!(
            clashing_route("blackhole 172.16.0.0/12\n", v4([172, 16, 9, 0], 24), false).is_some()
        );
        assert!(clashing_route("192.168.1.7 dev x\n", v4([192, 168, 1, 0], 24), false).is_some());
        let v6routes = "fe80::/64 dev eth0 proto kernel metric 256\nfd12:3456::/32 dev x\n";
        let net: Ipv6Addr = "fd12:3456:789a::".parse().unwrap();
        assert!(clashing_route(v6routes, (u128::from(net), 64), true).is_some());
        let net: Ipv6Addr = "fd99::".parse().unwrap();
        assert!(clashing_route(v6routes, (u128::from(net), 64), true).is_none());
    }
}
