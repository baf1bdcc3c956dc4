//! Job round trip on an idle pool: what a device pays to move one backend operation off the
//! register path (submit, a worker runs it, the caller's wait returns).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use blockemu_core::jobs::WorkerPool;

fn round_trip(c: &mut Criterion) {
    let pool = WorkerPool::new(2).unwrap();
    c.bench_function("jobs/submit_wait_idle_pool", |b| {
        b.iter(|| {
            let job = pool.submit(|| Ok(black_box(1u64)));
            black_box(job.wait(None).unwrap())
        })
    });
    c.bench_function("jobs/submit_on_complete_idle_pool", |b| {
        b.iter(|| {
            let (done, wake) = crossbeam_channel::bounded(1);
            pool.submit(|| Ok(black_box(1u64))).on_complete(move |r| {
                let _ = done.send(*r.as_ref().unwrap());
            });
            black_box(wake.recv().unwrap())
        })
    });
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
