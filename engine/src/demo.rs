//! `ringtun demo`: a working tunnel on this machine with nothing else installed.

use crate::EngineError;

/// Options of `ringtun demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Run one checked transfer and exit instead of keeping the tunnel up.
    #[arg(long)]
    pub once: bool,
}

/// Runs the demo.
pub fn run(_args: DemoArgs) -> Result<(), EngineError> {
    Err(EngineError::Demo("not built yet".into()))
}
