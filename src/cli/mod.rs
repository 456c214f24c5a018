//! Subcommands of the `kiln` binary, one module each.

pub mod bench;
pub mod compile;
pub mod conformance;
pub mod eval;
pub mod inspect;
pub mod prune;
pub mod quantize;
pub mod run;
pub mod targets;

use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// Parses repeated `NAME=VALUE` flags.
pub fn parse_pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{flag} expects NAME=VALUE, got '{s}'"),
        })
        .collect()
}

/// Parses `--dim NAME=VALUE` flags.
pub fn parse_dims(items: &[String]) -> Result<HashMap<String, usize>> {
    parse_pairs("--dim", items)?
        .into_iter()
        .map(|(k, v)| {
            let n = v.parse::<usize>().with_context(|| {
                format!("--dim {k}={v}: the value must be a non-negative integer")
            })?;
            Ok((k, n))
        })
        .collect()
}
