//! The Helm chart on a real one-node Kubernetes (`.ci/node.sh`: kubelet, containerd and
//! runc, real pods, Service DNS), installed from the images `.ci/node-images.sh` makes.
//! One node serves every step, in order, as one install lives through them: install,
//! a client in another namespace, a rolling upgrade under load, a leader pod deleted,
//! the NATS pod deleted, an eviction, the operator's API requests against its grants,
//! and uninstall with Meters present. Each step is reported like a test; a failed step
//! fails the run and the steps after it still run (the install permitting).
//!
//! A custom harness (`harness = false`): the node is started once before the steps and
//! stopped after them (KM_NODE_KEEP=1 leaves it running to look at). Arguments that are
//! not flags select steps by substring; `--list` lists them.

#[path = "../common/mod.rs"]
mod common;

mod client;
mod node;
mod steps;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps = steps::all();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &steps {
            println!("{name}: test");
        }
        return;
    }
    let wanted: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let chosen: Vec<_> = steps
        .into_iter()
        .filter(|(name, _)| wanted.is_empty() || wanted.iter().any(|w| name.contains(w.as_str())))
        .collect();
    if chosen.is_empty() {
        println!("running 0 tests");
        return;
    }
    println!("running {} tests (one real node, in order)", chosen.len());
    let started = Instant::now();
    let node = node::Node::up();
    let mut state = steps::State::new(&node);
    let mut failed = Vec::new();
    for (name, step) in chosen {
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| step(&mut state)));
        let secs = t.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("test {name} ... ok ({secs:.1} s)"),
            Err(_) => {
                println!("test {name} ... FAILED ({secs:.1} s)");
                failed.push(name);
            }
        }
    }
    state.report();
    drop(state);
    drop(node);
    println!(
        "\ntest result: {}. {} failed; finished in {:.1} s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        for f in &failed {
            println!("    {f}");
        }
        std::process::exit(101);
    }
}
