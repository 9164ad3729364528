//! CPU pinning (sched_setaffinity) and the start line for two pinned threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| {
        format!("CPU {cpu} is beyond the largest CPU number this system supports")
    })?;
    // Pid 0 = the calling thread (affinity is per thread on Linux).
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("cannot pin a thread to CPU {cpu} (is it online and allowed?)"))
}

/// The CPUs this process may run on, in ascending order.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity failed")?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// The first two CPUs this process may run on (the default `--cpus`).
pub fn default_cpus() -> Result<[usize; 2]> {
    let allowed = allowed_cpus()?;
    match allowed.as_slice() {
        [a, b, ..] => Ok([*a, *b]),
        _ => bail!(
            "the two-core benchmarks need at least 2 CPUs, but this process may only run on {allowed:?}"
        ),
    }
}

/// Checks that `cpus` are two different CPUs this process may run on.
pub fn check_cpus(cpus: [usize; 2]) -> Result<()> {
    let allowed = allowed_cpus()?;
    if allowed.len() < 2 {
        bail!("the two-core benchmarks need at least 2 CPUs, but this process may only run on {allowed:?}");
    }
    if cpus[0] == cpus[1] {
        bail!("--cpus needs two different CPUs, got {0},{0}", cpus[0]);
    }
    for cpu in cpus {
        if !allowed.contains(&cpu) {
            bail!("CPU {cpu} is not available to this process (allowed: {allowed:?})");
        }
    }
    Ok(())
}

/// Parses `--cpus A,B`.
pub fn parse_cpu_pair(text: &str) -> Result<[usize; 2]> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [a, b] => {
            let a = a.parse().with_context(|| format!("bad CPU number {a:?}"))?;
            let b = b.parse().with_context(|| format!("bad CPU number {b:?}"))?;
            Ok([a, b])
        }
        _ => bail!("expected two CPU numbers like 0,1, got {text:?}"),
    }
}

/// Runs `measuring` on a thread pinned to `cpus[0]` and `peer` on a thread pinned to `cpus[1]`;
/// both start together once both are pinned. Each side gets an abort flag: when the other side
/// fails it is set, and every busy-wait loop must give up when it sees it (so an error never
/// leaves a thread spinning forever). Returns what `measuring` returned.
pub fn run_pinned_pair<R: Send>(
    cpus: [usize; 2],
    measuring: impl FnOnce(&AtomicBool) -> Result<R> + Send,
    peer: impl FnOnce(&AtomicBool) -> Result<()> + Send,
) -> Result<R> {
    let start = Barrier::new(2);
    let abort = AtomicBool::new(false);
    let side = |cpu: usize| -> Result<()> {
        let pinned = pin_current_thread(cpu);
        if pinned.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        start.wait();
        pinned?;
        if abort.load(Ordering::SeqCst) {
            return Err(Aborted.into());
        }
        Ok(())
    };
    thread::scope(|scope| {
        let peer_thread = scope.spawn(|| {
            let result = side(cpus[1]).and_then(|()| peer(&abort));
            if result.is_err() {
                abort.store(true, Ordering::SeqCst);
            }
            result
        });
        let measured = scope
            .spawn(|| {
                let result = side(cpus[0]).and_then(|()| measuring(&abort));
                if result.is_err() {
                    abort.store(true, Ordering::SeqCst);
                }
                result
            })
            .join()
            .map_err(|_| anyhow!("the measuring thread panicked"))?;
        let peer_result = peer_thread
            .join()
            .map_err(|_| anyhow!("the peer thread panicked"))?;
        // Report the root cause: the side that failed first, not the one that saw the abort flag.
        match (measured, peer_result) {
            (Ok(value), Ok(())) => Ok(value),
            (Err(e), Ok(())) => Err(e),
            (Ok(_), Err(e)) => Err(e.context("peer thread")),
            (Err(m), Err(p)) if is_abort(&m) => Err(p.context("peer thread")),
            (Err(m), Err(_)) => Err(m),
        }
    })
}

/// Runs `work` on a thread pinned to `cpu` and returns its result.
pub fn run_pinned<R: Send>(cpu: usize, work: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                pin_current_thread(cpu)?;
                work()
            })
            .join()
            .map_err(|_| anyhow!("the pinned benchmark thread panicked"))?
    })
}

/// The error a busy-wait loop returns when the other side failed.
#[derive(Debug, thiserror::Error)]
#[error("stopped because the other benchmark thread failed")]
pub struct Aborted;

fn is_abort(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Aborted>().is_some()
}

/// Busy-polls `poll` until it yields a value, giving up with [`Aborted`] when `abort` is set.
#[inline(always)]
pub fn spin_until<T>(abort: &AtomicBool, mut poll: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    loop {
        if let Some(value) = poll()? {
            return Ok(value);
        }
        if abort.load(Ordering::Relaxed) {
            return Err(Aborted.into());
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_pairs() {
        assert_eq!(parse_cpu_pair("0,1").unwrap(), [0, 1]);
        assert_eq!(parse_cpu_pair(" 2 , 3 ").unwrap(), [2, 3]);
        assert!(parse_cpu_pair("0").is_err());
        assert!(parse_cpu_pair("0,1,2").is_err());
        assert!(parse_cpu_pair("a,1").is_err());
    }

    #[test]
    fn rejects_same_or_unavailable_cpus() {
        let err = check_cpus([0, 0]).unwrap_err().to_string();
        assert!(
            err.contains("two different CPUs") || err.contains("at least 2 CPUs"),
            "{err}"
        );
        let err = check_cpus([0, 100_000]).unwrap_err().to_string();
        assert!(
            err.contains("not available") || err.contains("at least 2 CPUs"),
            "{err}"
        );
    }

    #[test]
    fn a_failing_side_stops_the_spinning_side() {
        let cpus = default_cpus().unwrap();
        let err = run_pinned_pair(
            cpus,
            |abort| spin_until::<()>(abort, || Ok(None)),
            |_| bail!("peer broke"),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("peer broke"), "{err:#}");
    }

    #[test]
    fn pinning_to_a_missing_cpu_is_a_clear_error() {
        let err = run_pinned_pair([0, CpuSet::count() + 1], |_| Ok(()), |_| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("CPU"), "{err:#}");
    }
}
