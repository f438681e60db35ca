//! `segments.k`: one number of segments, a range or a list of candidates (TOML
//! `k = 6`, `k = { min = 3, max = 12 }`, `k = [4, 6, 8]`), with errors that show the
//! three forms.

use serde::{Deserialize, Serialize};

/// `segments.k`: one number of segments, or the candidates to choose from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentCount {
    One(u32),
    Range { min: u32, max: u32 },
    List(Vec<u32>),
}

impl SegmentCount {
    /// Every candidate, ascending, without repeats.
    pub fn candidates(&self) -> Vec<u32> {
        let mut all = match self {
            SegmentCount::One(k) => vec![*k],
            SegmentCount::Range { min, max } => (*min..=*max).collect(),
            SegmentCount::List(ks) => ks.clone(),
        };
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The one number of segments, when there is no choice to make.
    pub fn fixed(&self) -> Option<u32> {
        match self {
            SegmentCount::One(k) => Some(*k),
            SegmentCount::Range { min, max } if min == max => Some(*min),
            SegmentCount::Range { .. } => None,
            SegmentCount::List(_) => match self.candidates().as_slice() {
                [k] => Some(*k),
                _ => None,
            },
        }
    }

    /// The largest candidate (0 for an empty list).
    pub fn max(&self) -> u32 {
        match self {
            SegmentCount::One(k) => *k,
            SegmentCount::Range { min, max } => *max.max(min),
            SegmentCount::List(ks) => ks.iter().copied().max().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for SegmentCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SegmentCount::One(k) => write!(f, "{k}"),
            SegmentCount::Range { min, max } => write!(f, "{{ min = {min}, max = {max} }}"),
            SegmentCount::List(ks) => write!(f, "{ks:?}"),
        }
    }
}

impl Serialize for SegmentCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            SegmentCount::One(k) => s.serialize_u32(*k),
            SegmentCount::List(ks) => ks.serialize(s),
            SegmentCount::Range { min, max } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("min", min)?;
                m.serialize_entry("max", max)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for SegmentCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SegmentCountVisitor)
    }
}

struct SegmentCountVisitor;

impl<'de> serde::de::Visitor<'de> for SegmentCountVisitor {
    type Value = SegmentCount;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number of segments (k = 6), a range (k = { min = 3, max = 12 }) or a list (k = [4, 6, 8])")
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SegmentCount, E> {
        u32::try_from(v)
            .map(SegmentCount::One)
            .map_err(|_| E::custom(format!("k = {v}: a number of segments is at least 1")))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SegmentCount, E> {
        u32::try_from(v)
            .map(SegmentCount::One)
            .map_err(|_| E::custom(format!("k = {v} is too large")))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SegmentCount, A::Error> {
        let mut ks = Vec::new();
        while let Some(k) = seq.next_element::<u32>()? {
            ks.push(k);
        }
        Ok(SegmentCount::List(ks))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<SegmentCount, A::Error> {
        use serde::de::Error;
        let (mut min, mut max) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "min" => min = Some(map.next_value::<u32>()?),
                "max" => max = Some(map.next_value::<u32>()?),
                other => {
                    return Err(A::Error::custom(format!(
                        "unknown key `{other}` in a range of k: write k = {{ min = 3, max = 12 }}"
                    )));
                }
            }
        }
        match (min, max) {
            (Some(min), Some(max)) => Ok(SegmentCount::Range { min, max }),
            _ => Err(A::Error::custom(
                "a range of k needs both ends: k = { min = 3, max = 12 }",
            )),
        }
    }
}
