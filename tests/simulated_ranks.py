"""Ranks simulated in threads for the metrics' `reduce`: each rank updates its own metric with its share of the
maps, then all call `reduce` together with a barrier-synchronised sum (the semantics of accelerate's
`reduce(t, "sum")` / an all-reduce)."""

import threading


def run_ranks(make_metric, read, data, plan, timeout=60):
    """`data[rank] = (preds, labels)`; `plan[step][rank]`: how many maps that rank adds before the step's collective
    reduce. Returns `results[rank][step] = read(metric)` after each reduce."""
    world = len(data)
    slots, barrier = [None] * world, threading.Barrier(world)

    def all_reduce_sum(rank):
        def fn(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            t.zero_()  # the tensor handed over is scratch space; the result is what counts
            return total

        return fn

    results, errors = [[None] * len(plan) for _ in range(world)], []

    def run(rank):
        try:
            metric, used = make_metric(), 0
            for step, counts in enumerate(plan):
                for _ in range(counts[rank]):
                    metric.update(data[rank][0][used], data[rank][1][used])
                    used += 1
                metric.reduce(all_reduce_sum(rank))
                results[rank][step] = read(metric)
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    return results


def seen_until(data, plan, step):
    """The (pred, label) pairs all ranks have added up to and including `step`."""
    seen = []
    for rank in range(len(data)):
        n = sum(c[rank] for c in plan[: step + 1])
        seen += list(zip(data[rank][0][:n], data[rank][1][:n]))
    return seen
