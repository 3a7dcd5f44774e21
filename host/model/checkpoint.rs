//! Reading a Hugging Face style checkpoint directory: `config.json` plus one or more
//! `*.safetensors` shards, with or without `model.safetensors.index.json`.
//!
//! Shards are memory-mapped and only their headers are parsed when the directory is
//! opened; a tensor's bytes are touched only when [`Checkpoint::read`] asks for it, so
//! loading a few layers of a large model reads only those layers from disk.

use crate::config::Dtype;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Name of the shard index transformers writes next to sharded checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// One memory-mapped `.safetensors` file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// Default FP8 block size (DeepSeek-V3: `quantization_config.weight_block_size`).
pub const FP8_BLOCK: [usize; 2] = [128, 128];

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    /// Rows and columns covered by one `weight_scale_inv` value of an FP8 weight.
    fp8_block: [usize; 2],
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    location: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.location.len())
            .finish()
    }
}

fn ckpt_err(path: &Path, reason: impl ToString) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Largest `config.json` or index accepted (DeepSeek-V3's index, the largest released,
/// has about 9 MB).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Opens `path` for reading only if it is a regular file (after following links): a FIFO
/// would block the open, a device such as `/dev/zero` would never end.
fn open_regular(path: &Path) -> Result<(File, u64)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(ckpt_err(
            path,
            "not a regular file (a FIFO, device or directory?)",
        ));
    }
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ckpt_err(
            path,
            "not a regular file (it changed while opening)",
        ));
    }
    Ok((file, meta.len()))
}

fn read_json(path: &Path) -> Result<Value> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    if len > MAX_JSON_BYTES {
        return Err(ckpt_err(
            path,
            format!("{len} bytes, more than the {MAX_JSON_BYTES} accepted for JSON"),
        ));
    }
    let mut text = String::new();
    file.take(MAX_JSON_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if text.len() as u64 > MAX_JSON_BYTES {
        return Err(ckpt_err(path, "grew past the JSON size limit while read"));
    }
    parse_json(path, &text)
}

/// Parses JSON text (from `path`, named in errors); deeply nested input is refused by
/// serde_json's recursion limit rather than overflowing the stack.
pub fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| ckpt_err(path, format!("invalid JSON: {e}")))
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let (file, _) = open_regular(path)?;
        // SAFETY: the map is read-only and private to this process. The only hazard is
        // another process truncating or rewriting the file while it is mapped, which the
        // documentation of `Checkpoint::open` rules out (checkpoints are immutable inputs).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (header, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| ckpt_err(path, format!("not a valid safetensors file: {e}")))?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header,
            metadata,
        })
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }
}

impl Checkpoint {
    /// Opens `dir`: parses `config.json`, maps the shards named by
    /// `model.safetensors.index.json` (or, without an index, every `*.safetensors` file of
    /// the directory) and reads their headers. The files must not change while the
    /// checkpoint is open (they are memory-mapped).
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        let config = read_json(&dir.join(CONFIG_FILE))?;
        let index_path = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut location = HashMap::new();
        if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ckpt_err(&index_path, "no `weight_map` object"))?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (name, file) in entries {
                let file = file.as_str().ok_or_else(|| {
                    ckpt_err(
                        &index_path,
                        format!("weight_map[`{name}`] is not a file name"),
                    )
                })?;
                let shard = match by_file.get(file) {
                    Some(&i) => i,
                    None => {
                        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                            return Err(ckpt_err(
                                &index_path,
                                format!("weight_map[`{name}`] = `{file}` leaves the directory"),
                            ));
                        }
                        shards.push(Shard::open(&dir.join(file))?);
                        by_file.insert(file.to_string(), shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if shards[shard].info(name).is_none() {
                    return Err(ckpt_err(
                        &shards[shard].path,
                        format!("the index maps tensor `{name}` to this file, which lacks it"),
                    ));
                }
                location.insert(name.clone(), shard);
            }
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| Error::Io {
                    path: dir.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(ckpt_err(&dir, "no *.safetensors file and no index"));
            }
            for path in files {
                let shard = Shard::open(&path)?;
                for name in shard.metadata.tensors().into_keys() {
                    if let Some(&other) = location.get(&name) {
                        let first: &Shard = &shards[other];
                        return Err(ckpt_err(
                            &path,
                            format!("tensor `{name}` is also in {}", first.path.display()),
                        ));
                    }
                    location.insert(name, shards.len());
                }
                shards.push(shard);
            }
        }
        let fp8_block = fp8_block(&dir, &config)?;
        Ok(Checkpoint {
            dir,
            config,
            fp8_block,
            shards,
            location,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// Number of shard files.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.location.get(name)?];
        Some((shard, shard.info(name)?))
    }

    /// The raw bytes of a `U8` tensor `name` of exactly `shape` (MXFP4 blocks and scales).
    pub fn read_u8(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let Some((shard, info)) = self.info(name) else {
            return Err(ckpt_err(
                &self.dir,
                format!("tensor `{name}` is missing (expected U8 {shape:?})"),
            ));
        };
        if info.shape != shape || info.dtype != StDtype::U8 {
            return Err(ckpt_err(
                &shard.path,
                format!(
                    "tensor `{name}` is {:?} {:?}, expected U8 {shape:?}",
                    info.dtype, info.shape
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ckpt_err(&shard.path, format!("tensor `{name}` lies past the end")))
    }

    /// Integer tensor `name` (`I64` or `I32`) of exactly `shape` as u32 ids (DeepSeek-V4's
    /// `tid2eid`); a negative or too large value is an error naming the tensor.
    pub fn read_ids(&self, name: &str, shape: &[usize]) -> Result<Vec<u32>> {
        let Some((shard, info)) = self.info(name) else {
            return Err(ckpt_err(
                &self.dir,
                format!("tensor `{name}` is missing (expected I64 {shape:?})"),
            ));
        };
        let width = match info.dtype {
            StDtype::I64 => 8,
            StDtype::I32 => 4,
            _ => 0,
        };
        if info.shape != shape || width == 0 {
            return Err(ckpt_err(
                &shard.path,
                format!(
                    "tensor `{name}` is {:?} {:?}, expected I64 or I32 {shape:?}",
                    info.dtype, info.shape
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| ckpt_err(&shard.path, format!("tensor `{name}` lies past the end")))?;
        bytes
            .chunks_exact(width)
            .enumerate()
            .map(|(i, c)| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                let v = if width == 8 {
                    i64::from_le_bytes(b)
                } else {
                    i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                };
                u32::try_from(v).map_err(|_| {
                    ckpt_err(
                        &shard.path,
                        format!("tensor `{name}` value {i} is {v}, not an id"),
                    )
                })
            })
            .collect()
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.info(name).map(|(_, i)| i.shape.as_slice())
    }

    /// Reads tensor `name`, which must have exactly `shape`, as f32 (bf16, f16, f32 and
    /// f64 are converted exactly or by rounding to nearest), then rounds every value to
    /// `round_to` when given. Errors name the tensor and both shapes.
    ///
    /// FP8 weights (`F8_E4M3`, `F8_E5M2`, as in DeepSeek-V3's release) are dequantised
    /// with their companion `{name}_scale_inv`: one f32 per block of
    /// `quantization_config.weight_block_size` (default 128 x 128) elements, multiplied
    /// into every value of its block.
    pub fn read(&self, name: &str, shape: &[usize], round_to: Option<Dtype>) -> Result<Vec<f32>> {
        let Some((shard, info)) = self.info(name) else {
            return Err(ckpt_err(
                &self.dir,
                format!("tensor `{name}` is missing (expected shape {shape:?})"),
            ));
        };
        if info.shape != shape {
            return Err(ckpt_err(
                &shard.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    info.shape
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| ckpt_err(&shard.path, format!("tensor `{name}` lies past the end")))?;
        let mut values = decode(bytes, info.dtype).ok_or_else(|| Error::UnsupportedModel {
            path: shard.path.clone(),
            key: name.to_string(),
            value: format!("{:?}", info.dtype),
            reason: "tensor dtype not supported; supported: BF16, F16, F32, F64, and \
                     F8_E4M3 / F8_E5M2 with a block `weight_scale_inv`"
                .into(),
        })?;
        if matches!(info.dtype, StDtype::F8_E4M3 | StDtype::F8_E5M2) {
            self.dequantise(name, &shard.path, shape, &mut values)?;
        }
        let count: usize = shape.iter().product();
        if values.len() != count {
            return Err(ckpt_err(
                &shard.path,
                format!(
                    "tensor `{name}` holds {} values, its shape needs {count}",
                    values.len()
                ),
            ));
        }
        if let Some(d) = round_to {
            for v in &mut values {
                *v = d.round(*v);
            }
        }
        Ok(values)
    }
}

impl Checkpoint {
    /// Multiplies an FP8 weight by its block scales (`{name}_scale_inv`).
    fn dequantise(
        &self,
        name: &str,
        path: &Path,
        shape: &[usize],
        values: &mut [f32],
    ) -> Result<()> {
        let scale_name = format!("{name}_scale_inv");
        let &[rows, cols] = shape else {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                key: name.to_string(),
                value: format!("FP8 of shape {shape:?}"),
                reason: "only 2-D FP8 weights with block scales are supported".into(),
            });
        };
        if !self.contains(&scale_name) {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                key: name.to_string(),
                value: "FP8 without scales".into(),
                reason: format!("an FP8 weight needs its block scales `{scale_name}`"),
            });
        }
        let [br, bc] = self.fp8_block;
        let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let scales = self.read(&scale_name, &[sr, sc], None)?;
        for (r, row) in values.chunks_exact_mut(cols.max(1)).enumerate() {
            let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
            for (c, v) in row.iter_mut().enumerate() {
                *v *= srow[c / bc];
            }
        }
        Ok(())
    }
}

/// `quantization_config.weight_block_size` of `config.json`, or [`FP8_BLOCK`].
fn fp8_block(dir: &Path, config: &Value) -> Result<[usize; 2]> {
    let Some(v) = config
        .get("quantization_config")
        .and_then(|q| q.get("weight_block_size"))
    else {
        return Ok(FP8_BLOCK);
    };
    let parsed: Option<Vec<usize>> = v.as_array().map(|a| {
        a.iter()
            .filter_map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
            .filter(|&n| n > 0)
            .collect()
    });
    match parsed.as_deref() {
        Some(&[r, c]) if v.as_array().is_some_and(|a| a.len() == 2) => Ok([r, c]),
        _ => Err(ckpt_err(
            &dir.join(CONFIG_FILE),
            format!("config key `quantization_config.weight_block_size`: expected two positive integers, found {v}"),
        )),
    }
}

/// Decodes one FP8 E4M3FN value (OCP "fn" variant: no infinities, S.1111.111 is NaN).
pub fn f8_e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * (2.0f32).powi(-9)
    } else {
        sign * (1.0 + man / 8.0) * (2.0f32).powi(exp - 7)
    }
}

/// Decodes little-endian values of a float dtype to f32; `None` for other dtypes.
pub fn decode(bytes: &[u8], dtype: StDtype) -> Option<Vec<f32>> {
    let out = match dtype {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F8_E4M3 => bytes.iter().map(|&b| f8_e4m3fn_to_f32(b)).collect(),
        // E5M2 is the upper byte of an IEEE half.
        StDtype::F8_E5M2 => bytes
            .iter()
            .map(|&b| half::f16::from_bits(u16::from(b) << 8).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
}

#[cfg(test)]
mod tests;
