//! omicron-package's target flags (`target create -i standard -m non-gimlet -s stub -r
//! multi-sled -c single-node`): the keys they set, the defaults omicron fills in and the
//! combinations it refuses, with its reasons. A target made from `key=value` pairs or a preset
//! alone is not checked: these rules are omicron's vocabulary, not every workspace's.

use crate::cli::OmicronTarget;

impl OmicronTarget {
    /// Whether any of the flags was given.
    pub fn given(&self) -> bool {
        *self != OmicronTarget::default()
    }

    /// The `key=value` pairs the flags stand for, omicron's defaults included; an error, in
    /// omicron's words, for a combination omicron refuses. Empty when no flag was given.
    pub fn pairs(&self) -> Result<Vec<(String, String)>, String> {
        if !self.given() {
            return Ok(Vec::new());
        }
        let image = self.image.as_deref().unwrap_or("standard");
        let standard = image == "standard";
        let machine = self.machine.as_deref().or(standard.then_some("non-gimlet"));
        let switch = self.switch.as_deref().or(standard.then_some("stub"));
        if image == "trampoline" {
            if self.machine.is_some() {
                return Err("Trampoline image does not execute the sled agent (do not pass \
                            'machine' flag)"
                    .into());
            }
            if self.switch.is_some() {
                return Err("Trampoline image does not contain switch zone (do not pass 'switch' \
                            flag)"
                    .into());
            }
        }
        if switch == Some("asic") && machine != Some("gimlet") {
            return Err("'switch=asic' is only valid with 'machine=gimlet'".into());
        }
        let mut pairs = vec![("image", image)];
        pairs.extend(machine.map(|m| ("machine", m)));
        pairs.extend(switch.map(|s| ("switch", s)));
        pairs.push(("rack-topology", self.rack_topology.as_deref().unwrap_or("multi-sled")));
        pairs.push((
            "clickhouse-topology",
            self.clickhouse_topology.as_deref().unwrap_or("single-node"),
        ));
        Ok(pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&str, &str)]) -> OmicronTarget {
        let mut t = OmicronTarget::default();
        for (k, v) in pairs {
            let v = Some((*v).to_owned());
            match *k {
                "i" => t.image = v,
                "m" => t.machine = v,
                "s" => t.switch = v,
                "r" => t.rack_topology = v,
                "c" => t.clickhouse_topology = v,
                _ => unreachable!(),
            }
        }
        t
    }

    fn text(t: &OmicronTarget) -> Result<String, String> {
        t.pairs().map(|p| p.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
    }

    #[test]
    fn omicrons_defaults_fill_what_was_not_given() {
        assert_eq!(text(&flags(&[])).unwrap(), "");
        assert_eq!(
            text(&flags(&[("i", "standard")])).unwrap(),
            "image=standard machine=non-gimlet switch=stub rack-topology=multi-sled \
             clickhouse-topology=single-node"
        );
        assert_eq!(
            text(&flags(&[("m", "gimlet"), ("s", "asic"), ("r", "single-sled")])).unwrap(),
            "image=standard machine=gimlet switch=asic rack-topology=single-sled \
             clickhouse-topology=single-node"
        );
        // A trampoline image runs no sled agent and has no switch zone: neither key is set.
        assert_eq!(
            text(&flags(&[("i", "trampoline"), ("c", "replicated-cluster")])).unwrap(),
            "image=trampoline rack-topology=multi-sled clickhouse-topology=replicated-cluster"
        );
    }

    #[test]
    fn the_combinations_omicron_refuses_are_refused_with_its_reasons() {
        let err = text(&flags(&[("i", "trampoline"), ("m", "gimlet")])).unwrap_err();
        assert!(err.starts_with("Trampoline image does not execute the sled agent"), "{err}");
        let err = text(&flags(&[("i", "trampoline"), ("s", "stub")])).unwrap_err();
        assert!(err.starts_with("Trampoline image does not contain switch zone"), "{err}");
        for machine in [None, Some("non-gimlet"), Some("gimlet-standalone")] {
            let mut f = flags(&[("s", "asic")]);
            f.machine = machine.map(str::to_owned);
            assert_eq!(text(&f).unwrap_err(), "'switch=asic' is only valid with 'machine=gimlet'");
        }
    }
}
