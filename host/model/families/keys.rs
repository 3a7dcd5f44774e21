//! Typed access to the keys of a `config.json`, with errors that name the key.

use super::Family;
use crate::config::{Dtype, GroupLimit};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Typed access to the keys of a `config.json`.
#[derive(Clone, Copy)]
pub(super) struct Keys<'a> {
    pub(super) path: &'a Path,
    pub(super) json: &'a Value,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, want: &str) -> Error {
        let found = match self.get(key) {
            None => "missing".to_string(),
            Some(v) => format!("found {v}"),
        };
        Error::Checkpoint {
            path: self.path.to_path_buf(),
            reason: format!("config key `{key}`: expected {want}, {found}"),
        }
    }

    pub(super) fn unsupported(
        &self,
        key: &str,
        value: impl ToString,
        reason: impl ToString,
    ) -> Error {
        Error::UnsupportedModel {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(super) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "an unsigned integer")),
        }
    }

    pub(super) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.bad(key, "an unsigned integer"))
    }

    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a finite number")),
        }
    }

    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub(super) fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.bad(key, "a string")),
        }
    }

    pub(super) fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?
            .ok_or_else(|| self.bad(key, "a string"))
    }

    pub(super) fn opt_usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| self.bad(key, "a list of unsigned integers"))
                })
                .collect(),
            Some(_) => Err(self.bad(key, "a list of unsigned integers")),
        }
    }

    /// A list of unsigned integers, or `None` when the key is absent or null.
    pub(super) fn opt_usize_list_present(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.opt_usize_list(key).map(Some),
        }
    }

    /// A list of strings, or `None` when the key is absent or null.
    pub(super) fn opt_string_list_present(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| self.bad(key, "a list of strings"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.bad(key, "a list of strings")),
        }
    }

    /// `torch_dtype` (transformers 4) or `dtype` (transformers 5).
    pub(super) fn dtype(&self) -> Result<Option<Dtype>> {
        for key in ["torch_dtype", "dtype"] {
            if let Some(s) = self.opt_string(key)? {
                return match s.as_str() {
                    "bfloat16" => Ok(Some(Dtype::Bf16)),
                    "float16" => Ok(Some(Dtype::F16)),
                    "float32" => Ok(Some(Dtype::F32)),
                    other => Err(self.unsupported(
                        key,
                        other,
                        "supported model dtypes: bfloat16, float16, float32 \
                         (or pass a dtype in the load options)",
                    )),
                };
            }
        }
        Ok(None)
    }

    /// DeepSeek group-limited selection (`n_group` / `topk_group`; V2 only with
    /// `topk_method = group_limited_greedy`), or `None` where it cannot change the choice
    /// (`n_group` <= 1 or every group kept). The limits are checked by `MoeConfig::validate`.
    pub(super) fn group_limit(&self, family: Family) -> Result<Option<GroupLimit>> {
        let n_group = self.opt_usize("n_group")?;
        let topk_group = self.opt_usize("topk_group")?;
        let method = self.opt_string("topk_method")?;
        let grouped = match family {
            Family::DeepseekV2 => method.as_deref() == Some("group_limited_greedy"),
            _ => true,
        };
        if let Some(m) = method.as_deref() {
            let known: &[&str] = match family {
                Family::DeepseekV2 => &["greedy", "group_limited_greedy"],
                _ => &["noaux_tc"],
            };
            if !known.contains(&m) {
                return Err(self.unsupported(
                    "topk_method",
                    m,
                    format!("supported for {family}: {}", known.join(", ")),
                ));
            }
        }
        if !grouped {
            return Ok(None);
        }
        // transformers' DeepSeek-V3 defaults are n_group 8, topk_group 4.
        let (defaults_n, defaults_k) = match family {
            Family::DeepseekV3 => (8, 4),
            _ => (1, 1),
        };
        let groups = n_group.unwrap_or(defaults_n);
        let keep = topk_group.unwrap_or(defaults_k);
        Ok((groups > 1 && keep < groups).then_some(GroupLimit { groups, keep }))
    }
}
