//! An order-preserving parallel map over the machine's threads, for the host's few coarse
//! loops that dominate a bench's set-up (random experts, reference rows). Scoped std
//! threads: each item is milliseconds to seconds of work, so a pool buys nothing here.

/// `f` over `items` on up to the machine's threads (consecutive items per thread); the
/// results in the items' order. A panic in `f` is resumed on the caller's thread.
pub(crate) fn map_in_order<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
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
