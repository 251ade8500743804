//! Generic `Deserialize` helpers that validate strings (so errors carry path and line).

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A visitor for a string that must pass `parse`; `expecting` names the format.
struct ParsedStr<F> {
    expecting: &'static str,
    parse: F,
}

impl<'de, T, F: FnOnce(&str) -> Option<T>> Visitor<'de> for ParsedStr<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let expecting = self.expecting;
        (self.parse)(v).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &expecting))
    }
}

/// Deserializes a string through `parse`; a refusal names the value and `expecting`.
pub(super) fn de_parsed<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    d.deserialize_str(ParsedStr { expecting, parse })
}

/// An IP address with a message that shows the offending value.
struct Ip(IpAddr);

impl<'de> Deserialize<'de> for Ip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(d, "an IP address such as 10.0.0.1 or fd00::1", |s| {
            IpAddr::from_str(s).ok().map(Ip)
        })
    }
}

/// `deserialize_with` for a list of IP addresses (each refusal shows the offending value).
pub(super) fn de_ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    Ok(Vec::<Ip>::deserialize(d)?
        .into_iter()
        .map(|ip| ip.0)
        .collect())
}
