//! Checkpoints: safetensors files, single or sharded, memory-mapped and read by name.
//!
//! A [`Checkpoint`] maps every tensor name to its file and byte range. Nothing is read until a
//! tensor is asked for; each request checks the tensor's shape against what the model expects
//! and names the tensor and directory on error. Tensors are decoded one at a time, so a model
//! never needs more host memory than its final in-memory form plus one tensor in flight.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::Metadata;

use crate::bail;
use crate::error::{Error, Result};
use crate::tensor::{CpuStorage, DType, Tensor};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; the engine never writes a checkpoint it has
        // mapped, and a concurrent external truncation is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::Model(format!(
                "{}: not a valid safetensors file ({e}); is it truncated or still downloading?",
                path.display()
            ))
        })?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + n,
            metadata,
        })
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// The storage dtype, `None` for non-float tensors (an error only if one is read).
    pub dtype: Option<DType>,
    pub stored: safetensors::Dtype,
    pub shape: Vec<usize>,
    file: usize,
    range: (usize, usize),
}

/// All safetensors files of a model (or adapter) directory, indexed by tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    entries: HashMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Open `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", index.display())))?;
            let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
                bail!(Model, "{}: no `weight_map` object", index.display());
            };
            let mut shards: BTreeMap<String, ()> = BTreeMap::new();
            for (name, file) in map {
                let Some(file) = file.as_str() else {
                    bail!(
                        Model,
                        "{}: weight_map[{name}] is not a file name",
                        index.display()
                    );
                };
                shards.insert(file.to_string(), ());
            }
            let paths: Vec<PathBuf> = shards.keys().map(|f| dir.join(f)).collect();
            let ck = Self::open_files(dir, &paths)?;
            for name in map.keys() {
                if !ck.entries.contains_key(name) {
                    bail!(
                        Model,
                        "{}: lists `{name}` but no shard holds it",
                        index.display()
                    );
                }
            }
            Ok(ck)
        } else if single.exists() {
            Self::open_files(dir, &[single])
        } else {
            bail!(
                Model,
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )
        }
    }

    /// Open an explicit list of safetensors files as one checkpoint.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let f = MappedFile::open(path)?;
            for (name, info) in f.metadata.tensors() {
                let entry = TensorEntry {
                    dtype: DType::from_safetensors(info.dtype).ok(),
                    stored: info.dtype,
                    shape: info.shape.clone(),
                    file: fi,
                    range: info.data_offsets,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    bail!(
                        Model,
                        "{}: tensor `{name}` appears in more than one shard",
                        dir.display()
                    );
                }
            }
            files.push(f);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        match self.entries.get(name) {
            Some(e) => Ok(e),
            None => bail!(Model, "{}: missing tensor `{name}`", self.dir.display()),
        }
    }

    /// Raw little-endian bytes of a tensor, checked against `shape`.
    pub fn bytes(&self, name: &str, shape: &[usize]) -> Result<(&[u8], DType)> {
        let e = self.entry(name)?;
        let f = &self.files[e.file];
        if e.shape != shape {
            bail!(
                Shape,
                "{}: tensor `{name}` has shape {:?}, the model expects {shape:?}",
                f.path.display(),
                e.shape
            );
        }
        let Some(dtype) = e.dtype else {
            bail!(
                Model,
                "{}: tensor `{name}` is stored as {:?}; expected F32, BF16 or F16",
                f.path.display(),
                e.stored
            );
        };
        let bytes = &f.mmap[f.data_start + e.range.0..f.data_start + e.range.1];
        Ok((bytes, dtype))
    }

    /// Load a tensor in its stored dtype.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (bytes, dtype) = self.bytes(name, shape)?;
        Tensor::from_cpu(CpuStorage::from_le_bytes(bytes, dtype), shape)
    }

    /// Load a tensor converted to `dtype`.
    pub fn load_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.load(name, shape)?.to_dtype(dtype)
    }
}

/// Write tensors to a safetensors file atomically (temp file in the same directory, then
/// rename), so a crash never leaves a half-written checkpoint under the final name.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>, Vec<u8>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use safetensors::tensor::TensorView;
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let d = match dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
            };
            TensorView::new(d, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Shape(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, metadata)?;
    crate::io::write_atomic(path, &data)
}
