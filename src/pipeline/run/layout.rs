//! Who does what: the world's ranks grouped by node, each node split into readers, writers and
//! compute ranks, and the roles of one rank.
//!
//! Imports nothing of the crate: the layout is arithmetic on rank numbers.

/// What a rank does besides coordinating (world rank 0 always hands out the frames).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    /// Reads and cuts frames.
    pub reader: bool,
    /// Writes frames.
    pub writer: bool,
    /// Extracts units.
    pub compute: bool,
}

impl Roles {
    pub(super) fn name(&self) -> String {
        let mut v = Vec::new();
        if self.reader {
            v.push("reader");
        }
        if self.writer {
            v.push("writer");
        }
        if self.compute {
            v.push("compute");
        }
        if v.is_empty() {
            v.push("idle");
        }
        v.join("+")
    }
}

/// Who does what: ranks grouped by node, each node split into readers, writers and computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// World ranks of each node, ascending.
    pub nodes: Vec<Vec<usize>>,
    /// Per node: reader ranks.
    pub readers: Vec<Vec<usize>>,
    /// Per node: writer ranks.
    pub writers: Vec<Vec<usize>>,
    /// Per node: compute ranks.
    pub computes: Vec<Vec<usize>>,
}

impl Layout {
    /// Splits each node's ranks: one rank plays every role; two ranks are reader+writer and
    /// compute; more get `readers` readers, `writers` writers (at least one of each) and the
    /// rest compute, keeping at least one compute rank.
    pub fn new(nodes: Vec<Vec<usize>>, readers: usize, writers: usize) -> Layout {
        let mut l = Layout {
            readers: Vec::new(),
            writers: Vec::new(),
            computes: Vec::new(),
            nodes: Vec::new(),
        };
        for ranks in nodes {
            let n = ranks.len();
            let (r, w, c) = match n {
                0 => (vec![], vec![], vec![]),
                1 => (ranks.clone(), ranks.clone(), ranks.clone()),
                2 => (vec![ranks[0]], vec![ranks[0]], vec![ranks[1]]),
                _ => {
                    let nr = readers.clamp(1, n - 2);
                    let nw = writers.clamp(1, n - 1 - nr);
                    (
                        ranks[..nr].to_vec(),
                        ranks[nr..nr + nw].to_vec(),
                        ranks[nr + nw..].to_vec(),
                    )
                }
            };
            l.readers.push(r);
            l.writers.push(w);
            l.computes.push(c);
            l.nodes.push(ranks);
        }
        l
    }

    /// Where a node has too few ranks for `readers` readers and `writers` writers (they are cut
    /// so that a compute rank remains), what it got instead, for the log; `None` where every
    /// node got what was asked.
    pub fn roles_cut(&self, readers: usize, writers: usize) -> Option<String> {
        let cut: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.readers[i].len() != readers || self.writers[i].len() != writers)
            .collect();
        let &first = cut.first()?;
        let others = match cut.len() - 1 {
            0 => String::new(),
            1 => " (and on 1 other node)".to_string(),
            n => format!(" (and on {n} other nodes)"),
        };
        Some(format!(
            "--readers-per-node {readers} and --writers-per-node {writers} do not fit node \
             {first}'s {} rank(s), which keep at least one compute rank: it has {} reader(s), \
             {} writer(s) and {} compute rank(s){others}",
            self.nodes[first].len(),
            self.readers[first].len(),
            self.writers[first].len(),
            self.computes[first].len(),
        ))
    }

    pub(super) fn node_of(&self, rank: usize) -> usize {
        self.nodes
            .iter()
            .position(|n| n.contains(&rank))
            .expect("every rank is on a node")
    }

    pub(super) fn roles(&self, rank: usize) -> Roles {
        let node = self.node_of(rank);
        Roles {
            reader: self.readers[node].contains(&rank),
            writer: self.writers[node].contains(&rank),
            compute: self.computes[node].contains(&rank),
        }
    }

    /// The reader a compute rank asks for work: the node's readers in turn.
    pub(super) fn reader_of(&self, compute: usize) -> usize {
        let node = self.node_of(compute);
        let i = self.computes[node]
            .iter()
            .position(|&c| c == compute)
            .expect("a compute rank");
        let readers = &self.readers[node];
        readers[i % readers.len()]
    }

    /// The compute ranks a reader serves.
    pub(super) fn computes_of(&self, reader: usize) -> Vec<usize> {
        let node = self.node_of(reader);
        self.computes[node]
            .iter()
            .copied()
            .filter(|&c| self.reader_of(c) == reader)
            .collect()
    }

    /// The writer of a frame cut on `node`.
    pub(super) fn writer_of(&self, node: usize, job: usize) -> usize {
        let w = &self.writers[node];
        w[job % w.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_give_every_node_each_role() {
        let l = Layout::new(vec![vec![0]], 1, 1);
        assert_eq!(
            l.roles(0),
            Roles {
                reader: true,
                writer: true,
                compute: true
            }
        );
        let l = Layout::new(vec![vec![0, 1], vec![2, 3, 4, 5, 6]], 1, 1);
        assert_eq!(l.readers, vec![vec![0], vec![2]]);
        assert_eq!(l.writers, vec![vec![0], vec![3]]);
        assert_eq!(l.computes, vec![vec![1], vec![4, 5, 6]]);
        assert_eq!(l.reader_of(5), 2);
        assert_eq!(l.computes_of(2), vec![4, 5, 6]);
        // Two readers share the compute ranks in turn; a writer request beyond the ranks is
        // clamped so that one compute rank remains.
        let l = Layout::new(vec![vec![0, 1, 2, 3, 4]], 2, 5);
        assert_eq!(l.readers[0], vec![0, 1]);
        assert_eq!(l.writers[0], vec![2, 3]);
        assert_eq!(l.computes[0], vec![4]);
        assert_eq!(l.writer_of(0, 3), 3);
    }

    /// A request for more readers or writers than a node can give is said, with what each
    /// node got; one that fits says nothing.
    #[test]
    fn roles_cut_to_fit_a_node_are_said() {
        let l = Layout::new(vec![vec![0, 1, 2, 3]], 1000, 1);
        let msg = l
            .roles_cut(1000, 1)
            .expect("1000 readers do not fit 4 ranks");
        assert!(
            msg.contains("node 0's 4 rank(s)")
                && msg.contains("2 reader(s), 1 writer(s) and 1 compute rank(s)"),
            "{msg}"
        );
        assert_eq!(
            Layout::new(vec![vec![0, 1, 2, 3]], 2, 1).roles_cut(2, 1),
            None
        );
        let one = Layout::new(vec![vec![0]], 3, 1);
        assert!(one.roles_cut(3, 1).unwrap().contains("1 reader(s)"));
        let two_nodes = Layout::new(vec![vec![0, 1, 2], vec![3, 4, 5]], 1, 5);
        assert!(two_nodes
            .roles_cut(1, 5)
            .unwrap()
            .ends_with("(and on 1 other node)"));
    }
}
