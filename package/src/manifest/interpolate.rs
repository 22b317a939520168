//! `{{key}}` substitution from the build target, as omicron-zone-package does in `source.paths`.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::target::Target;

/// A string from the manifest that may contain `{{key}}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct InterpolatedString(String);

impl InterpolatedString {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text as written in the manifest.
    pub fn raw(&self) -> &str {
        &self.0
    }

    /// Substitutes every `{{key}}` with the target's value for `key`. An unclosed `{{` or a key
    /// the target does not define is an error rather than a silent empty string, because either
    /// would put files in the wrong place.
    pub fn interpolate(&self, target: &Target) -> Result<String, String> {
        let mut rest = self.0.as_str();
        let mut out = String::with_capacity(rest.len());
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            rest = &rest[start + 2..];
            let Some(end) = rest.find("}}") else {
                return Err(format!("`{}` has `{{{{` without a closing `}}}}`", self.0));
            };
            let key = rest[..end].trim();
            let Some(value) = target.get(key) else {
                return Err(format!(
                    "`{}` uses `{{{{{key}}}}}` but the target ({}) does not define `{key}`",
                    self.0, target
                ));
            };
            out.push_str(value);
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

impl fmt::Display for InterpolatedString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(pairs: &[(&str, &str)]) -> Target {
        Target::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn substitutes_every_placeholder() {
        let t = target(&[("machine", "gimlet"), ("image", "standard")]);
        let s = InterpolatedString::new("smf/{{machine}}/{{image}}/x-{{machine}}");
        assert_eq!(s.interpolate(&t).unwrap(), "smf/gimlet/standard/x-gimlet");
        assert_eq!(InterpolatedString::new("plain").interpolate(&t).unwrap(), "plain");
    }

    #[test]
    fn missing_key_and_unclosed_brace_are_errors() {
        let t = target(&[("image", "standard")]);
        assert_eq!(
            InterpolatedString::new("smf/{{machine}}").interpolate(&t).unwrap_err(),
            "`smf/{{machine}}` uses `{{machine}}` but the target (image=standard) does not \
             define `machine`"
        );
        assert_eq!(
            InterpolatedString::new("smf/{{machine").interpolate(&t).unwrap_err(),
            "`smf/{{machine` has `{{` without a closing `}}`"
        );
    }
}
