//! The crate's one error type.
//!
//! Every fallible function returns [`Result`]. Errors carry the context a user needs to fix
//! the problem (file, row, field, tensor name); `Error::context` wraps an error with one more
//! layer of "while doing X" and the `Display` impl prints the chain outermost first.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, in categories that map onto exit codes and test assertions.
#[derive(Debug)]
pub enum Error {
    /// Reading or writing a file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A data file (CSV) is malformed; `row` is the 1-based data row (header excluded).
    Data {
        file: PathBuf,
        row: Option<usize>,
        field: Option<String>,
        msg: String,
    },
    /// A model directory, config, checkpoint or adapter does not fit what is expected.
    Model(String),
    /// Tensor shapes or dtypes disagree.
    Shape(String),
    /// The command line asks for something that cannot be done.
    Usage(String),
    /// The CUDA driver or a kernel launch failed, or no GPU can be used.
    Cuda(String),
    /// A failure with one more layer of context.
    Context { context: String, source: Box<Error> },
    /// Anything else.
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn data(
        file: impl AsRef<Path>,
        row: Option<usize>,
        field: Option<&str>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Data {
            file: file.as_ref().to_path_buf(),
            row,
            field: field.map(str::to_string),
            msg: msg.into(),
        }
    }

    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The innermost error, past every `Context` layer.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Data {
                file,
                row,
                field,
                msg,
            } => {
                write!(f, "{}", file.display())?;
                if let Some(r) = row {
                    write!(f, ", row {r}")?;
                }
                if let Some(c) = field {
                    write!(f, ", field `{c}`")?;
                }
                write!(f, ": {msg}")
            }
            Error::Model(m) | Error::Shape(m) | Error::Usage(m) | Error::Msg(m) => f.write_str(m),
            Error::Cuda(m) => write!(f, "CUDA: {m}"),
            Error::Context { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Context { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Msg(format!("JSON: {e}"))
    }
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error::Model(format!("safetensors: {e}"))
    }
}

/// Return early with a formatted [`Error::Msg`] (or any variant given explicitly).
#[macro_export]
macro_rules! bail {
    ($variant:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$variant(format!($($arg)*)))
    };
}
