//! Order-preserving parallel maps over the machine's threads (std scoped threads, one part
//! of consecutive items per thread): packing experts, generating random experts, reference
//! rows and router logits. Each item is milliseconds to seconds of work, so a pool buys
//! nothing here.

/// The machine's threads.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f` over `items` on up to the machine's threads; the results in the items' order. A
/// panic in `f` is resumed on the caller's thread.
pub(crate) fn map_in_order<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads() <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    spread(items, |part| part.iter().map(&f).collect())
}

/// `f` over consecutive parts of `items`, one part per thread, results in order.
pub(crate) fn spread<T: Sync, R: Send>(items: &[T], f: impl Fn(&[T]) -> Vec<R> + Sync) -> Vec<R> {
    spread_over(items, threads(), f)
}

/// [`spread`] over at most `threads` threads.
pub(crate) fn spread_over<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> Vec<R> + Sync,
) -> Vec<R> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = items.chunks(per).map(|p| s.spawn(|| f(p))).collect();
        join_all(parts)
    })
}

/// [`spread`] over mutable parts.
pub(crate) fn spread_mut<T: Send, R: Send>(
    items: &mut [T],
    f: impl Fn(&mut [T]) -> Vec<R> + Sync,
) -> Vec<R> {
    let per = items.len().div_ceil(threads()).max(1);
    std::thread::scope(|s| {
        let f = &f;
        let parts: Vec<_> = items
            .chunks_mut(per)
            .map(|p| s.spawn(move || f(p)))
            .collect();
        join_all(parts)
    })
}

/// The results of `parts` in order; a panic in one is resumed here.
fn join_all<R>(parts: Vec<std::thread::ScopedJoinHandle<'_, Vec<R>>>) -> Vec<R> {
    parts
        .into_iter()
        .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect()
}
#[cfg(test)]
mod tests {
    use super::map_in_order;

    #[test]
    fn results_keep_the_items_order() {
        for n in [0usize, 1, 2, 7, 100] {
            let items: Vec<usize> = (0..n).collect();
            assert_eq!(
                map_in_order(&items, |&i| i * i),
                items.iter().map(|i| i * i).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    #[should_panic(expected = "item 3")]
    fn a_panic_reaches_the_caller() {
        let items: Vec<usize> = (0..8).collect();
        map_in_order(&items, |&i| if i == 3 { panic!("item 3") } else { i });
    }
}
