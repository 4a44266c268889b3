//! Every read model that `dossier projections rebuild` knows, in one place.
//!
//! [`Projection`] has an `async fn`, so projections cannot sit in one list as
//! trait objects; each [`Registered`] keeps a plain function that rebuilds its
//! projection instead. A new read model is one line in [`all`] (and one in the
//! start-up's list of runners).

use std::future::Future;
use std::pin::Pin;

use dossier_eventlog::db::Pool;

use crate::bundles::BundlesProjection;
use crate::customers::CustomersProjection;
use crate::error::ProjectionError;
use crate::files::FilesProjection;
use crate::portal::PortalProjection;
use crate::projection::Projection;
use crate::rebuild::{RebuildOptions, RebuildProgress, RebuildReport, rebuild_with_options};

/// What a registered rebuild returns.
pub type RebuildFuture<'a> =
    Pin<Box<dyn Future<Output = Result<RebuildReport, ProjectionError>> + Send + 'a>>;

/// Where a rebuild reports its progress.
pub type ProgressFn<'a> = dyn Fn(RebuildProgress) + Send + Sync + 'a;

type RebuildFn = for<'a> fn(&'a Pool, RebuildOptions, &'a ProgressFn<'a>) -> RebuildFuture<'a>;

/// One read model the command line can rebuild.
#[derive(Clone, Copy)]
pub struct Registered {
    name: &'static str,
    rebuild: RebuildFn,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Registered {
    /// The registration of projection `P`.
    pub fn of<P: Projection + Default>() -> Self {
        Self {
            name: P::default().name(),
            rebuild: rebuild_boxed::<P>,
        }
    }

    /// The projection's name (its checkpoint's name).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Rebuilds it from the log and swaps it in ([`crate::rebuild()`]), with
    /// `options` (the deployment's keys, to open personal fields).
    pub fn rebuild<'a>(
        &self,
        pool: &'a Pool,
        options: RebuildOptions,
        progress: &'a ProgressFn<'a>,
    ) -> RebuildFuture<'a> {
        (self.rebuild)(pool, options, progress)
    }
}

fn rebuild_boxed<'a, P: Projection + Default>(
    pool: &'a Pool,
    options: RebuildOptions,
    progress: &'a ProgressFn<'a>,
) -> RebuildFuture<'a> {
    Box::pin(async move { rebuild_with_options(pool, &P::default(), options, progress).await })
}

/// Every read model of the service, in rebuild order.
pub fn all() -> Vec<Registered> {
    vec![
        Registered::of::<FilesProjection>(),
        Registered::of::<PortalProjection>(),
        Registered::of::<BundlesProjection>(),
        Registered::of::<CustomersProjection>(),
    ]
}

/// The read model called `name`.
pub fn find(name: &str) -> Option<Registered> {
    all()
        .into_iter()
        .find(|registered| registered.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let names: Vec<&str> = all().iter().map(Registered::name).collect();
        for (i, name) in names.iter().enumerate() {
            assert!(!names[i + 1..].contains(name), "{name} is registered twice");
            assert!(find(name).is_some());
        }
        assert!(names.contains(&"files"));
        assert!(names.contains(&"customers"));
        assert!(find("no_such_projection").is_none());
    }
}
