//! kiln-passes: graph-to-graph rewrites. Every pass is a small struct implementing [`Pass`];
//! a [`Pipeline`] runs passes in order and (when asked, as tests always do) runs the IR
//! verifier after each one, naming the pass that broke an invariant. Passes take typed
//! options; only the root package knows YAML and the command line.

mod batchnorm;
mod cleanup;
pub mod prune;
pub mod quantize;

pub use batchnorm::FoldBatchNorm;
pub use cleanup::{DeadCodeElimination, EliminateIdentity};
pub use prune::Prune;
pub use quantize::{ExcludeLayers, QuantizeWeights};

use kiln_compiler::ir::verify::{verify, VerifyError};
use kiln_compiler::Graph;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PassError {
    #[error("pass '{pass}' left an invalid graph: {source}")]
    Invalid {
        pass: &'static str,
        source: VerifyError,
    },
    #[error("pass '{pass}': {reason}")]
    Failed { pass: &'static str, reason: String },
}

/// What a pass did, for the compile report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    pub changed: bool,
    pub notes: Vec<String>,
}

pub trait Pass {
    /// A stable kebab-case name used in reports and configs.
    fn name(&self) -> &'static str;
    fn run(&self, graph: &mut Graph) -> Result<PassReport, PassError>;
}

/// An ordered list of passes.
#[derive(Default)]
pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
    verify_each: bool,
}

impl Pipeline {
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Runs the verifier after every pass.
    pub fn verify_each(mut self, yes: bool) -> Pipeline {
        self.verify_each = yes;
        self
    }

    pub fn with(mut self, pass: impl Pass + 'static) -> Pipeline {
        self.passes.push(Box::new(pass));
        self
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    pub fn run(&self, graph: &mut Graph) -> Result<Vec<(&'static str, PassReport)>, PassError> {
        let mut reports = Vec::with_capacity(self.passes.len());
        for p in &self.passes {
            let r = p.run(graph)?;
            if self.verify_each {
                verify(graph).map_err(|source| PassError::Invalid {
                    pass: p.name(),
                    source,
                })?;
            }
            reports.push((p.name(), r));
        }
        Ok(reports)
    }
}
