//! `kiln orchestrator`: the global orchestrator that the processes of a data-parallel run
//! (`[distributed]`) meet through.

use anyhow::Result;

/// Serves on `port` of every interface until interrupted.
pub fn orchestrator(port: u16) -> Result<()> {
    eprintln!(
        "orchestrator listening on 0.0.0.0:{port}; start the processes with distributed.orchestrator = \"<this host>:{port}\" (Ctrl-C stops it)"
    );
    kiln_train::distributed::run_orchestrator(port)?;
    Ok(())
}
