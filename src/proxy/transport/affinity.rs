//! Binding the proxy's worker threads to CPUs (`workerCpuAffinity`).
//!
//! Each worker is a single-threaded runtime that owns its connections, so a worker that waits
//! for a core holds every one of them. Left to the kernel on a small machine shared with other
//! busy processes, two workers can end up taking turns on one core while the other core runs
//! something else: then each worker's connections wait out the other worker's time slice
//! (`perf sched timehist` on the latency matrix showed both workers on one core and wake-up
//! delays of up to 5 ms, against 1.6 ms for nginx's worker and 3 ms for HAProxy's threads).
//! One worker per core, bound, removes that wait.
//!
//! The rule is one worker per CPU of the process's affinity mask: with the default worker
//! count (one per CPU the process may use, fewer under a CPU quota) that binds a whole machine
//! or VM, a container without a CPU limit, and a pod given exclusive CPUs by the static CPU
//! manager; a pod whose CPU limit is below its node's CPUs has fewer workers than CPUs and
//! stays free. The price: a bound worker cannot move away from a neighbour that takes its
//! core, where the kernel would move it; `off` is for machines where that matters more. The
//! binding is made once, at start (CPUs taken offline later, or a cpuset changed later, are
//! not followed).

use crate::proxy::config::CpuAffinity;

/// The CPU each worker is bound to, in worker order, or None when nothing is bound: `auto`
/// binds when the process may run on exactly as many CPUs (`allowed`, ascending) as it has
/// workers.
pub fn plan(mode: CpuAffinity, allowed: &[usize], workers: usize) -> Option<Vec<usize>> {
    match mode {
        CpuAffinity::Off => None,
        CpuAffinity::Auto if workers > 0 && allowed.len() == workers => Some(allowed.to_vec()),
        CpuAffinity::Auto => None,
    }
}

/// The CPUs this thread may run on, ascending (empty where the platform cannot say).
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        use rustix::thread::{sched_getaffinity, CpuSet};
        match sched_getaffinity(None) {
            Ok(set) => (0..CpuSet::MAX_CPU)
                .filter(|&cpu| set.is_set(cpu))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
    #[cfg(not(target_os = "linux"))]
    Vec::new()
}

/// Binds the calling thread to `cpu`.
pub fn bind_current_thread(cpu: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::thread::{sched_setaffinity, CpuSet};
        if cpu >= CpuSet::MAX_CPU {
            return Err(std::io::Error::other(format!("CPU {cpu} is out of range")));
        }
        let mut set = CpuSet::new();
        set.set(cpu);
        sched_setaffinity(None, &set).map_err(std::io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        Err(std::io::Error::other("binding threads to CPUs needs Linux"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_bound_only_when_they_match_the_cpus_the_process_may_use() {
        use CpuAffinity::{Auto, Off};
        // (mode, CPUs the process may use, workers, the binding wanted)
        type Case = (
            CpuAffinity,
            &'static [usize],
            usize,
            Option<&'static [usize]>,
        );
        let cases: &[Case] = &[
            // A whole 2-core machine, one worker per core.
            (Auto, &[0, 1], 2, Some(&[0, 1])),
            // A pod with exclusive CPUs 4 and 6 (static CPU manager).
            (Auto, &[4, 6], 2, Some(&[4, 6])),
            (Auto, &[3], 1, Some(&[3])),
            // More CPUs than workers (a CPU limit on a larger node): free to move.
            (Auto, &[0, 1, 2, 3], 2, None),
            // More workers than CPUs (APITREE_WORKERS above the cores): nothing bound.
            (Auto, &[0, 1], 3, None),
            // The platform cannot say.
            (Auto, &[], 2, None),
            (Auto, &[], 0, None),
            (Off, &[0, 1], 2, None),
            (Off, &[0], 1, None),
        ];
        for (mode, allowed, workers, want) in cases {
            assert_eq!(
                plan(*mode, allowed, *workers).as_deref(),
                *want,
                "{mode:?} with CPUs {allowed:?} and {workers} workers"
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_bound_thread_runs_on_its_cpu_only_and_others_keep_theirs() {
        let before = allowed_cpus();
        assert!(!before.is_empty(), "sched_getaffinity answers on Linux");
        let cpu = *before.last().unwrap();
        let inside = std::thread::spawn(move || {
            bind_current_thread(cpu).unwrap();
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(inside, vec![cpu]);
        // The binding is the spawned thread's own.
        assert_eq!(allowed_cpus(), before);
        assert!(bind_current_thread(usize::MAX).is_err());
    }
}
