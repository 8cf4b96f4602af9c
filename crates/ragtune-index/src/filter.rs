//! Metadata filters: an AND of `key = value` equality conditions.

use crate::error::{Error, Result};

/// The pseudo-key that matches a chunk's document id instead of a metadata entry.
pub const DOC_ID_KEY: &str = "doc_id";

/// An AND of `key = value` equality conditions on chunk metadata. The key `doc_id` matches
/// the chunk's document id. An empty filter matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    conds: Vec<(String, String)>,
}

impl Filter {
    /// One condition `key = value`.
    pub fn eq(key: impl Into<String>, value: impl Into<String>) -> Self {
        Filter {
            conds: vec![(key.into(), value.into())],
        }
    }

    /// This filter AND `other`.
    pub fn and(mut self, other: Filter) -> Self {
        self.conds.extend(other.conds);
        self
    }

    /// The conditions, as `(key, value)` pairs.
    pub fn conditions(&self) -> &[(String, String)] {
        &self.conds
    }

    /// Parses `key=value` conditions joined by `,`, `&&` or ` AND ` (case-sensitive), e.g.
    /// `category=Copyleft, doc_id=gpl-3.0`. Keys and values are trimmed; a value may be
    /// double-quoted to keep separators or surrounding spaces (`title="a, b"`).
    ///
    /// # Errors
    /// [`Error::InvalidFilter`] for an empty expression, a term without `=`, an empty key or
    /// value, or an unterminated quote.
    pub fn parse(expr: &str) -> Result<Filter> {
        let err = |detail: &str| Error::InvalidFilter {
            expr: expr.to_string(),
            detail: detail.to_string(),
        };
        let mut conds = Vec::new();
        let mut rest = expr;
        loop {
            let Some(eq) = rest.find('=') else {
                return Err(err(&format!("term {:?} has no `=`", rest.trim())));
            };
            let key = rest[..eq].trim();
            if key.is_empty() {
                return Err(err("empty key before `=`"));
            }
            if key.contains([',', '"']) || key.contains("&&") {
                return Err(err(&format!("key {key:?} contains a separator or quote")));
            }
            let after = rest[eq + 1..].trim_start();
            let (value, tail) = if let Some(q) = after.strip_prefix('"') {
                let Some(close) = q.find('"') else {
                    return Err(err("unterminated quote"));
                };
                (q[..close].to_string(), &q[close + 1..])
            } else {
                let cut = [",", "&&", " AND "]
                    .iter()
                    .filter_map(|s| after.find(s))
                    .min()
                    .unwrap_or(after.len());
                let v = after[..cut].trim();
                if v.is_empty() {
                    return Err(err(&format!("empty value for key {key:?}")));
                }
                (v.to_string(), &after[cut..])
            };
            conds.push((key.to_string(), value));
            let tail = tail.trim_start();
            if tail.is_empty() {
                break;
            }
            let next = tail
                .strip_prefix(',')
                .or_else(|| tail.strip_prefix("&&"))
                .or_else(|| tail.strip_prefix("AND "));
            match next {
                Some(n) if !n.trim().is_empty() => rest = n,
                Some(_) => return Err(err("dangling separator at the end")),
                None => return Err(err(&format!("unexpected text {tail:?} after a value"))),
            }
        }
        Ok(Filter { conds })
    }

    /// Whether a chunk with `doc_id` and sorted `metadata` pairs satisfies every condition.
    pub fn matches(&self, doc_id: &str, metadata: &[(&str, &str)]) -> bool {
        self.conds.iter().all(|(k, v)| {
            if k == DOC_ID_KEY {
                doc_id == v
            } else {
                metadata.iter().any(|(mk, mv)| mk == k && mv == v)
            }
        })
    }
}

impl std::str::FromStr for Filter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Filter> {
        Filter::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(
            Filter::parse("category=Copyleft").expect("p"),
            Filter::eq("category", "Copyleft")
        );
        let f = Filter::parse(" a = 1 , b=two words && c=3 AND doc_id=gpl-3.0").expect("p");
        assert_eq!(
            f.conditions(),
            &[
                ("a".into(), "1".into()),
                ("b".into(), "two words".into()),
                ("c".into(), "3".into()),
                ("doc_id".into(), "gpl-3.0".into())
            ]
        );
        let f = Filter::parse(r#"t="x, y",u=v"#).expect("p");
        assert_eq!(f, Filter::eq("t", "x, y").and(Filter::eq("u", "v")));
        for bad in [
            "",
            "abc",
            "=v",
            "k=",
            "k=v,",
            "k=\"v",
            "k=\"v\" junk",
            "a=b,,c=d",
        ] {
            assert!(
                matches!(Filter::parse(bad), Err(Error::InvalidFilter { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn matching() {
        let f = Filter::eq("doc_id", "mit").and(Filter::eq("cat", "Permissive"));
        assert!(f.matches("mit", &[("cat", "Permissive"), ("z", "1")]));
        assert!(!f.matches("mit", &[("cat", "Copyleft")]));
        assert!(!f.matches("gpl", &[("cat", "Permissive")]));
        assert!(Filter::default().matches("x", &[]));
    }
}
