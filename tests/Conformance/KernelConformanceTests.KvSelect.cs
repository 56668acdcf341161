using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.KvSelect;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Conformance;

/// <summary>
/// TokenSelect (kernels/kv_select.cu on the CUDA devices, KvSelector on the CPU) against the fp64 ReferenceKvSelect:
/// the soft votes within Tolerances.KvSelectVote, the index list's frame (init, local, count, ascending), the middle
/// part an exact top-k of the device's own votes (ties to the lower position) that agrees with the reference's top-k
/// wherever the reference's margin exceeds the tolerance; GQA groups of 1, 3, 4, 5 and 16, head_dim 32/64/80/96/128 (80 and 96 leave lanes of a row idle), a batch whose
/// second sequence is too short to select (full list), prefill (mean of several query rows), the planted needles and the
/// selection cache. A batch of 3 has one sequence too short to select and two that select over different contexts.
/// </summary>
public sealed partial class KernelConformanceTests
{
    public static IEnumerable<TestCaseData> KvSelectCases() => Cases("kv_select", device =>
        from dtype in device.Activations
        from shape in new (int Heads, int KvHeads, int HeadDim, int Batch, int Context, int Tokens, int TopK, int Initial, int Local)[]
        {
            (8, 2, 64, 2, 700, 1, 64, 16, 32),
            (8, 2, 64, 3, 900, 1, 64, 16, 32),
            (8, 2, 128, 1, 1500, 1, 100, 4, 16),
            (4, 4, 32, 2, 2100, 1, 333, 0, 1),
            (10, 2, 64, 1, 600, 7, 50, 8, 8),
            (8, 8, 64, 1, 400, 3, 300, 2, 2),
            (12, 4, 80, 1, 500, 1, 40, 4, 8),
            (16, 1, 96, 1, 300, 2, 20, 0, 4),
        }
        select new object[]
        {
            dtype, P("heads", shape.Heads), P("kv_heads", shape.KvHeads), P("head_dim", shape.HeadDim), P("batch", shape.Batch), P("context", shape.Context),
            P("tokens", shape.Tokens), P("k", shape.TopK), P("init", shape.Initial), P("local", shape.Local),
        });

    [TestCaseSource(nameof(KvSelectCases))]
    public void kv_select(string deviceName, DType dtype, int heads, int kvHeads, int headDim, int batch, int context, int tokens, int topK, int initial,
        int local)
    {
        var options = new KvSelectOptions { TopK = topK, Initial = initial, Local = local, CacheThreshold = 1f };
        // The second sequence is too short to select (its list is every position); a third selects over a shorter context.
        int[] contexts = Enumerable.Range(0, batch).Select(b => b switch
        {
            0 => context,
            1 => Math.Min(context, options.MaxIndices - 3),
            _ => Math.Max(options.MaxIndices + 1, context * 3 / 4),
        }).ToArray();
        int capacity = context + 5;
        var keys = OpBackend.Representable(dtype, Random(context + headDim, batch * kvHeads * capacity * headDim, 2));
        var q = OpBackend.Representable(dtype, Random(heads + context, batch * tokens * heads * headDim, 2));
        using var selection = SelectionDevice.Create(ConformanceDevices.Get(deviceName), dtype, options, batch, heads, kvHeads, headDim, capacity, keys);

        var (lists, votes) = selection.Step(q, tokens, contexts, useCache: false);

        string what = $"kv_select({dtype}, heads={heads}, kv_heads={kvHeads}, head_dim={headDim}, context={context}, tokens={tokens}, k={topK}, init={initial}, local={local})";
        for (int b = 0; b < batch; b++)
        {
            int n = contexts[b];
            if (!options.Selects(n))
            {
                Assert.That(lists[b], Is.EqualTo(Enumerable.Range(0, n).ToArray()), $"{what}: sequence {b} (context {n}) lists every position");
                continue;
            }
            int width = tokens * heads * headDim;
            var (expected, scoreError) = ReferenceKvSelect.Votes(q.AsSpan(b * width, width), tokens, heads,
                keys.AsSpan(b * kvHeads * capacity * headDim, kvHeads * capacity * headDim), kvHeads, headDim, capacity, n, initial, local);
            double relative = Tolerances.KvSelectVote(expected.Length, heads, scoreError);
            AssertClose(votes[b], expected, i => relative * expected[i] + 1e-30, $"{what}: votes of sequence {b}");
            AssertSelection(lists[b], votes[b], expected, relative, options, n, $"{what}: sequence {b}");
        }
    }

    public static IEnumerable<TestCaseData> KvSelectNeedleCases() => Cases("kv_select_needles", device =>
        from dtype in device.Activations
        select new object[] { dtype, P("context", 3000), P("k", 8) });

    /// <summary>Random keys with five planted tokens whose keys point along the query of their KV head's group: whatever
    /// else is selected, they must be.</summary>
    [TestCaseSource(nameof(KvSelectNeedleCases))]
    public void kv_select_needles(string deviceName, DType dtype, int context, int topK)
    {
        const int heads = 8, kvHeads = 2, headDim = 64;
        int group = heads / kvHeads;
        var options = new KvSelectOptions { TopK = topK, Initial = 4, Local = 16, CacheThreshold = 1f };
        int capacity = context;
        var keys = Random(91, kvHeads * capacity * headDim, 1);
        var q = OpBackend.Representable(dtype, Random(92, heads * headDim, 1));
        int[] needles = [37, 777, 1500, 2222, context - options.Local - 1];
        foreach (int needle in needles)
        {
            for (int kv = 0; kv < kvHeads; kv++)
            {
                for (int d = 0; d < headDim; d++)
                {
                    double direction = 0;
                    for (int g = 0; g < group; g++)
                    {
                        direction += q[(kv * group + g) * headDim + d];
                    }
                    keys[(kv * capacity + needle) * headDim + d] = (float)(direction * 1.5);
                }
            }
        }
        keys = OpBackend.Representable(dtype, keys);
        using var selection = SelectionDevice.Create(ConformanceDevices.Get(deviceName), dtype, options, 1, heads, kvHeads, headDim, capacity, keys);

        var (lists, _) = selection.Step(q, 1, [context], useCache: false);

        Assert.That(lists[0], Has.Length.EqualTo(options.MaxIndices));
        Assert.That(lists[0], Is.SupersetOf(needles), $"kv_select_needles({deviceName}, {dtype}): the planted tokens are selected");
    }

    public static IEnumerable<TestCaseData> KvSelectCacheCases() => Cases("kv_select_cache", device =>
        from dtype in device.Activations
        select new object[] { dtype, P("context", 900) });

    /// <summary>Three decode steps: a selection; a slightly perturbed query (cosine about 0.99) that reuses it while the
    /// local window moves; the negated query, a miss that selects anew. With the threshold at 1 the second step selects too.</summary>
    [TestCaseSource(nameof(KvSelectCacheCases))]
    public void kv_select_cache(string deviceName, DType dtype, int context)
    {
        const int heads = 8, kvHeads = 2, headDim = 64;
        int capacity = context + 8;
        var keys = OpBackend.Representable(dtype, Random(5, kvHeads * capacity * headDim, 2));
        var q = OpBackend.Representable(dtype, Random(6, heads * headDim, 2));
        var noise = Random(7, q.Length, 0.1);
        var similar = OpBackend.Representable(dtype, q.Select((x, i) => x + noise[i]).ToArray());
        var opposite = q.Select(x => -x).ToArray();
        foreach (float threshold in new[] { 0.9f, 1f })
        {
            var options = new KvSelectOptions { TopK = 40, Initial = 4, Local = 16, CacheThreshold = threshold };
            using var selection = SelectionDevice.Create(ConformanceDevices.Get(deviceName), dtype, options, 1, heads, kvHeads, headDim, capacity, keys);
            var first = selection.Step(q, 1, [context], useCache: true).Lists[0];
            var second = selection.Step(similar, 1, [context + 3], useCache: true).Lists[0];
            string what = $"kv_select_cache({deviceName}, {dtype}, cache={threshold})";
            var middle = (int[] list) => list[options.Initial..(options.Initial + options.TopK)];
            Assert.That(second[(options.Initial + options.TopK)..], Is.EqualTo(Enumerable.Range(context + 3 - options.Local, options.Local).ToArray()),
                $"{what}: the local window moves with the context");
            if (threshold < 1f)
            {
                Assert.That(middle(second), Is.EqualTo(middle(first)), $"{what}: a similar query reuses the selection");
                Assert.That(selection.Statistics, Is.EqualTo((Selections: 1L, Hits: 1L)), what);
                var third = selection.Step(opposite, 1, [context + 4], useCache: true).Lists[0];
                Assert.That(selection.Statistics, Is.EqualTo((Selections: 2L, Hits: 1L)), $"{what}: a dissimilar query selects anew");
                Assert.That(third, Is.Ordered.Ascending);
            }
            else
            {
                Assert.That(selection.Statistics, Is.EqualTo((Selections: 2L, Hits: 0L)), $"{what}: the cache is off");
            }
        }
    }

    /// <summary>The frame and an exact top-k of the device's own votes, consistent with the reference's top-k.</summary>
    private static void AssertSelection(int[] list, float[] votes, double[] expected, double relative, KvSelectOptions options, int context, string what)
    {
        Assert.That(list, Has.Length.EqualTo(options.MaxIndices), $"{what}: count");
        Assert.That(list[..options.Initial], Is.EqualTo(Enumerable.Range(0, options.Initial).ToArray()), $"{what}: init part");
        Assert.That(list[(options.Initial + options.TopK)..], Is.EqualTo(Enumerable.Range(context - options.Local, options.Local).ToArray()), $"{what}: local part");
        var middle = list[options.Initial..(options.Initial + options.TopK)];
        Assert.That(middle, Is.Ordered.Ascending.And.Unique, $"{what}: middle ascending");
        Assert.That(middle.All(p => p >= options.Initial && p < context - options.Local), $"{what}: middle inside the candidates");
        var chosen = new HashSet<int>(middle.Select(p => p - options.Initial));
        // Exact top-k of the device's votes: every chosen vote >= every other; at the k-th value, lower positions first.
        float kth = chosen.Min(c => votes[c]);
        int lastEqualChosen = chosen.Where(c => votes[c] == kth).Max();
        for (int c = 0; c < votes.Length; c++)
        {
            if (!chosen.Contains(c))
            {
                Assert.That(votes[c] < kth || (votes[c] == kth && c > lastEqualChosen), $"{what}: candidate {c} (vote {votes[c]}) beats a chosen one (k-th {kth})");
            }
        }
        // Against the reference: clear winners are chosen, clear losers are not.
        double referenceKth = expected.OrderDescending().ElementAt(options.TopK - 1);
        for (int c = 0; c < expected.Length; c++)
        {
            double margin = 2 * relative * Math.Max(expected[c], referenceKth);
            if (expected[c] > referenceKth + margin)
            {
                Assert.That(chosen, Does.Contain(c), $"{what}: candidate {c} (reference vote {expected[c]:R} > k-th {referenceKth:R}) is not chosen");
            }
            else if (expected[c] < referenceKth - margin)
            {
                Assert.That(chosen, Does.Not.Contain(c), $"{what}: candidate {c} (reference vote {expected[c]:R} < k-th {referenceKth:R}) is chosen");
            }
        }
    }

    /// <summary>A selection on one conformance device, kept across steps (the selection cache): the CPU's KvSelector over
    /// per-sequence KV caches, or the kv_select op over device tensors.</summary>
    private abstract class SelectionDevice : IDisposable
    {
        public static SelectionDevice Create(OpBackend device, DType dtype, KvSelectOptions options, int batch, int heads, int kvHeads, int headDim,
            int capacity, float[] keys) => device switch
        {
            CudaOpBackend cuda => new CudaSelection(cuda.Device, dtype, options, batch, heads, kvHeads, headDim, capacity, keys),
            _ => new CpuSelection(options, batch, heads, kvHeads, headDim, capacity, keys),
        };

        /// <summary>q: [batch, tokens, heads, head_dim]. Returns each sequence's index list and the votes of its candidates
        /// (the last new selection's).</summary>
        public abstract (int[][] Lists, float[][] Votes) Step(float[] q, int tokens, int[] contexts, bool useCache);

        public abstract (long Selections, long Hits) Statistics { get; }

        public abstract void Dispose();
    }

    private sealed unsafe class CpuSelection : SelectionDevice
    {
        private readonly KvSelector[] _selectors;
        private readonly KvCache[] _caches;
        private readonly int _width;

        public CpuSelection(KvSelectOptions options, int batch, int heads, int kvHeads, int headDim, int capacity, float[] keys)
        {
            _width = heads * headDim;
            _selectors = new KvSelector[batch];
            _caches = new KvCache[batch];
            int rows = capacity * headDim;
            for (int b = 0; b < batch; b++)
            {
                _selectors[b] = new KvSelector(options, 1, heads, kvHeads, headDim, capacity);
                _caches[b] = new KvCache(1, kvHeads, headDim, capacity) { Length = capacity };
                for (int h = 0; h < kvHeads; h++)
                {
                    keys.AsSpan((b * kvHeads + h) * rows, rows).CopyTo(new Span<float>(_caches[b].Keys(0, h), rows));
                }
            }
        }

        public override (int[][] Lists, float[][] Votes) Step(float[] q, int tokens, int[] contexts, bool useCache)
        {
            var lists = new int[_selectors.Length][];
            var votes = new float[_selectors.Length][];
            for (int b = 0; b < _selectors.Length; b++)
            {
                bool selects = _selectors[b].Select(0, q.AsSpan(b * tokens * _width, tokens * _width), tokens, _caches[b], contexts[b], useCache, out var positions);
                lists[b] = selects ? positions.ToArray() : Enumerable.Range(0, contexts[b]).ToArray();
                votes[b] = _selectors[b].LastVotes(contexts[b]).ToArray();
            }
            return (lists, votes);
        }

        public override (long Selections, long Hits) Statistics =>
            (_selectors.Sum(s => s.Statistics.Selections), _selectors.Sum(s => s.Statistics.CacheHits));

        public override void Dispose()
        {
            foreach (var cache in _caches)
            {
                cache.Dispose();
            }
        }
    }

    private sealed class CudaSelection : SelectionDevice
    {
        private readonly CudaDevice _device;
        private readonly DType _dtype;
        private readonly KvSelectOptions _options;
        private readonly int _batch, _heads, _headDim, _capacity;
        private readonly List<DeviceTensor> _owned = [];
        private readonly DeviceTensor _keys;
        private readonly DeviceTensor _contexts;
        private readonly KvSelectScratch _scratch;
        private readonly KvSelectLayerTensors _layer;

        public CudaSelection(CudaDevice device, DType dtype, KvSelectOptions options, int batch, int heads, int kvHeads, int headDim, int capacity, float[] keys)
        {
            (_device, _dtype, _options, _batch, _heads, _headDim, _capacity) = (device, dtype, options, batch, heads, headDim, capacity);
            _keys = device.Allocate("k_cache", dtype, batch, kvHeads, capacity, headDim);
            _owned.Add(_keys);
            _keys.Upload<byte>(OpBackend.Encode(dtype, keys));
            _contexts = device.Allocate("contexts", DType.I32, batch);
            _owned.Add(_contexts);
            _scratch = KvSelectScratch.Allocate(device, batch, heads, capacity, _owned);
            _layer = CudaOps.KvSelectAllocateLayer(device, "kv_select", batch, heads * headDim, options, _owned);
        }

        public override (int[][] Lists, float[][] Votes) Step(float[] q, int tokens, int[] contexts, bool useCache)
        {
            using var query = _device.Allocate("q", _dtype, _batch, tokens, _heads, _headDim);
            query.Upload<byte>(OpBackend.Encode(_dtype, q));
            _contexts.Upload<int>(contexts);
            CudaOps.KvSelect(_device, query, _keys, _contexts, contexts.Max(), _options, useCache, _scratch, _layer);
            int[] indices = _layer.Indices.Download<int>();
            int[] counts = _layer.IndexCounts.Download<int>();
            float[] votes = _scratch.Votes.Download<float>();
            var lists = new int[_batch][];
            var candidateVotes = new float[_batch][];
            for (int b = 0; b < _batch; b++)
            {
                lists[b] = indices.AsSpan(b * _options.MaxIndices, counts[b]).ToArray();
                int candidates = Math.Max(0, contexts[b] - _options.Initial - _options.Local);
                candidateVotes[b] = _options.Selects(contexts[b]) ? votes.AsSpan(b * _capacity, candidates).ToArray() : [];
            }
            return (lists, candidateVotes);
        }

        public override (long Selections, long Hits) Statistics
        {
            get
            {
                int[] state = _layer.State.Download<int>();
                long selections = 0, hits = 0;
                for (int b = 0; b < _batch; b++)
                {
                    selections += state[b * CudaOps.KvSelectStateFields + CudaOps.KvSelectSelectionsField];
                    hits += state[b * CudaOps.KvSelectStateFields + CudaOps.KvSelectHitsField];
                }
                return (selections, hits);
            }
        }

        public override void Dispose()
        {
            foreach (var tensor in _owned)
            {
                tensor.Dispose();
            }
        }
    }
}
