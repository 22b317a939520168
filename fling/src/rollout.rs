//! The order and the batches in which a rolling deploy reaches its servers.
//!
//! A ramp of batch sizes (`[1, "25%", "100%"]`: the last size repeats), a failure budget over
//! the whole fleet, and quorum groups: servers whose members of one cluster must never restart
//! more than `floor((n-1)/2)` at once (at least one, so that a group of one or two still
//! upgrades), with the group's current leader, when known, restarted last.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;

/// One step of the ramp: a number of servers, or a percentage of all of them (rounded up, at
/// least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(NonZeroUsize),
    Percent(u8),
}

impl BatchSize {
    /// `"25%"` or `"3"`.
    pub fn parse(text: &str) -> Result<BatchSize, String> {
        if let Some(p) = text.strip_suffix('%') {
            return match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(BatchSize::Percent(p)),
                _ => Err(format!("{text:?}: a percentage is 1% to 100%")),
            };
        }
        match text.parse::<usize>().ok().and_then(NonZeroUsize::new) {
            Some(n) => Ok(BatchSize::Count(n)),
            None => Err(format!("{text:?}: give a number of servers (1 or more) or a percentage")),
        }
    }

    /// How many servers of `total` this step takes.
    pub fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Count(n) => n.get(),
            BatchSize::Percent(p) => (total * usize::from(p)).div_ceil(100).max(1),
        }
    }
}

/// The failure budget: servers of the whole fleet (not of one batch) that may fail before no
/// further batch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Count(usize),
    Percent(u8),
}

impl Budget {
    /// `"10%"` or `"2"`; `"0"` allows no failure.
    pub fn parse(text: &str) -> Result<Budget, String> {
        if let Some(p) = text.strip_suffix('%') {
            return match p.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Budget::Percent(p)),
                _ => Err(format!("{text:?}: a percentage is 0% to 100%")),
            };
        }
        text.parse()
            .map(Budget::Count)
            .map_err(|_| format!("{text:?}: give a number of servers or a percentage"))
    }

    /// How many of `total` servers may fail (a percentage rounds down).
    pub fn allowed(self, total: usize) -> usize {
        match self {
            Budget::Count(n) => n,
            Budget::Percent(p) => total * usize::from(p) / 100,
        }
    }
}

/// Servers that form one quorum, and the one that leads it, if the service can say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumGroup {
    pub name: String,
    pub members: Vec<String>,
    pub leader: Option<String>,
}

impl QuorumGroup {
    /// How many members may restart at once and the group keep its quorum: `floor((n-1)/2)`,
    /// at least one.
    pub fn max_restarting(&self) -> usize {
        (self.members.len().saturating_sub(1) / 2).max(1)
    }
}

/// The batches of a rolling deploy of `servers` (in their order), sized by `ramp`, no batch
/// holding more of a quorum group than the group can lose; each group's leader is deferred to
/// the group's last batch. Every server is in exactly one batch.
pub fn batches(servers: &[String], ramp: &[BatchSize], groups: &[QuorumGroup]) -> Vec<Vec<String>> {
    let group_of: BTreeMap<&str, &QuorumGroup> =
        groups.iter().flat_map(|g| g.members.iter().map(move |m| (m.as_str(), g))).collect();
    // Leaders go last, in their own order.
    let is_leader = |s: &str| group_of.get(s).is_some_and(|g| g.leader.as_deref() == Some(s));
    let mut left: Vec<&String> = servers.iter().filter(|s| !is_leader(s)).collect();
    left.extend(servers.iter().filter(|s| is_leader(s)));

    let total = servers.len();
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    while !left.is_empty() {
        let step = ramp.get(out.len()).or(ramp.last()).copied();
        let size = step.map_or(total, |s| s.of(total));
        let mut batch: Vec<String> = Vec::new();
        let mut in_batch: BTreeMap<&str, usize> = BTreeMap::new();
        let mut rest = Vec::new();
        for server in left {
            let fits = match group_of.get(server.as_str()) {
                Some(g) => in_batch.get(g.name.as_str()).copied().unwrap_or(0) < g.max_restarting(),
                None => true,
            };
            // A leader waits until the rest of its group restarted in earlier batches.
            let leader_waits = is_leader(server)
                && group_of[server.as_str()]
                    .members
                    .iter()
                    .any(|m| m != server && servers.contains(m) && !done.contains(m));
            if batch.len() < size && fits && !leader_waits {
                if let Some(g) = group_of.get(server.as_str()) {
                    *in_batch.entry(g.name.as_str()).or_default() += 1;
                }
                batch.push(server.clone());
            } else {
                rest.push(server);
            }
        }
        // Never empty: leaders come after every other server, and the first other server
        // always fits. The guard keeps the loop finite whatever the input.
        if batch.is_empty() {
            batch = rest.drain(..).cloned().collect();
        }
        done.extend(batch.iter().cloned());
        out.push(batch);
        left = rest;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("n{i}")).collect()
    }

    fn group(name: &str, members: &[&str], leader: Option<&str>) -> QuorumGroup {
        QuorumGroup {
            name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            leader: leader.map(String::from),
        }
    }

    #[test]
    fn sizes_and_budgets_parse_as_written() {
        assert_eq!(BatchSize::parse("25%").unwrap().of(8), 2);
        assert_eq!(BatchSize::parse("25%").unwrap().of(3), 1);
        assert_eq!(BatchSize::parse("1%").unwrap().of(8), 1);
        assert_eq!(BatchSize::parse("3").unwrap().of(8), 3);
        for bad in ["0", "0%", "101%", "-1", "x", ""] {
            assert!(BatchSize::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Budget::parse("10%").unwrap().allowed(8), 0);
        assert_eq!(Budget::parse("25%").unwrap().allowed(8), 2);
        assert_eq!(Budget::parse("0").unwrap().allowed(8), 0);
        assert_eq!(Budget::parse("2").unwrap().allowed(8), 2);
        assert!(Budget::parse("101%").is_err() && Budget::parse("some").is_err());
    }

    #[test]
    fn a_ramp_repeats_its_last_size_and_covers_every_server_once() {
        let ramp = [BatchSize::Count(NonZeroUsize::new(1).unwrap()), BatchSize::Percent(25)];
        let b = batches(&names(8), &ramp, &[]);
        assert_eq!(
            b,
            [vec!["n1"], vec!["n2", "n3"], vec!["n4", "n5"], vec!["n6", "n7"], vec!["n8"]]
        );
        let all = batches(&names(8), &[], &[]);
        assert_eq!(all, [names(8)], "no ramp: all at once");
    }

    #[test]
    fn a_quorum_group_never_loses_its_quorum_and_its_leader_goes_last() {
        // Five etcd members: at most two restart at once; the leader n2 last.
        let etcd = group("etcd", &["n1", "n2", "n3", "n4", "n5"], Some("n2"));
        let all_at_once = [BatchSize::Percent(100)];
        let b = batches(&names(6), &all_at_once, std::slice::from_ref(&etcd));
        assert_eq!(b, [vec!["n1", "n3", "n6"], vec!["n4", "n5"], vec!["n2"]]);
        // Three members: one at a time.
        let three = group("etcd", &["n1", "n2", "n3"], None);
        let b = batches(&names(3), &all_at_once, &[three]);
        assert_eq!(b, [vec!["n1"], vec!["n2"], vec!["n3"]]);
        // Every batch respects the bound, whatever the ramp.
        for size in 1..=6 {
            let ramp = [BatchSize::Count(NonZeroUsize::new(size).unwrap())];
            let b = batches(&names(6), &ramp, std::slice::from_ref(&etcd));
            assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 6);
            for batch in &b {
                assert!(batch.len() <= size);
                let members = batch.iter().filter(|s| etcd.members.contains(s)).count();
                assert!(members <= 2, "{batch:?}");
            }
            assert_eq!(b.last().unwrap().last().unwrap(), "n2", "leader last: {b:?}");
        }
    }
}
