using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Signals;

namespace KernelLM.Models.Scoring;

/// <summary>
/// The numbers of one teacher-forced position i >= 1: log p(token_i | tokens before i), the entropy (nats),
/// excess kurtosis and top-1/top-2 margin of that distribution, the top alternatives when asked for, and
/// against a reference model q: KL(p || q), KL(q || p) and log p(token_i) - log q(token_i) (NaN without one).
/// Definitions: <see cref="VocabStatsField"/>.
/// </summary>
public readonly record struct TokenScore(int Position, int Token, float LogProbability, float Entropy, float Kurtosis, float Margin,
    float KlPq, float KlQp, float LogRatio, IReadOnlyList<TokenAlternative> Top);

/// <summary>
/// One scored text: its token ids (BOS included where the tokenizer adds one), a <see cref="TokenScore"/> for
/// every position after the first, and the per-text sums, accumulated in fp64.
/// </summary>
public sealed class TextScore
{
    internal TextScore(int[] tokens, TokenScore[] positions, bool hasReference)
    {
        Tokens = tokens;
        Positions = positions;
        HasReference = hasReference;
        double logProbabilities = 0, entropies = 0, klPq = 0, klQp = 0, logRatios = 0;
        foreach (var position in positions)
        {
            logProbabilities += position.LogProbability;
            entropies += position.Entropy;
            klPq += position.KlPq;
            klQp += position.KlQp;
            logRatios += position.LogRatio;
        }
        int count = positions.Length;
        SumLogProbability = logProbabilities;
        Perplexity = Math.Exp(-logProbabilities / count);
        MeanEntropy = entropies / count;
        MeanKlPq = hasReference ? klPq / count : double.NaN;
        MeanKlQp = hasReference ? klQp / count : double.NaN;
        SumLogRatio = hasReference ? logRatios : double.NaN;
    }

    public IReadOnlyList<int> Tokens { get; }
    public IReadOnlyList<TokenScore> Positions { get; }
    public bool HasReference { get; }

    /// <summary>sum_i log p(token_i | before): the text's log-likelihood after its first token.</summary>
    public double SumLogProbability { get; }

    /// <summary>exp(-SumLogProbability / positions).</summary>
    public double Perplexity { get; }
    public double MeanEntropy { get; }

    /// <summary>Mean over positions of KL(p || q); NaN without a reference.</summary>
    public double MeanKlPq { get; }

    /// <summary>Mean over positions of KL(q || p); NaN without a reference.</summary>
    public double MeanKlQp { get; }

    /// <summary>log p(text) - log q(text) (after the first token); NaN without a reference.</summary>
    public double SumLogRatio { get; }
}

/// <summary>
/// Teacher-forced scoring in prefill chunks: each chunk of up to <see cref="ChunkLength"/> positions goes
/// through the model's forward pass with all positions' logits (the GEMMs see the chunk's rows at once) and
/// then through one fused <see cref="VocabStats"/>.Reduce over those rows, with the next ids as the tokens. With a reference model, its forward pass runs over the
/// same chunk and its rows enter the same reduction (KL both ways, log-ratio).
///
/// Buffers are allocated once per scorer and reused across texts:
///   logits          [chunk, model vocab]      fp32 (unmanaged)
///   referenceLogits [chunk, reference vocab]  fp32 (unmanaged; with a reference)
///   stats           [chunk, VocabStats.FieldCount]
///   topIds / topLogProbs [chunk, topK]
/// The models' sequence states are leased for the length of one text, so generation and scoring on the same
/// <see cref="LanguageModel"/> take turns.
/// </summary>
public sealed class Scorer : IDisposable
{
    /// <summary>Encoded by both models to check that they tokenize alike (BOS handling, post-processor template).</summary>
    internal const string TokenizerProbe = "Hello, world! 123";

    private readonly LanguageModel _model;
    private readonly LanguageModel? _reference;
    private readonly int _topK;
    private readonly int _width;
    private readonly NativeBuffer<float> _logits;
    private readonly NativeBuffer<float>? _referenceLogits;
    private readonly float[] _stats;
    private readonly int[] _topIds;
    private readonly float[] _topLogProbs;
    private bool _disposed;

    /// <summary>
    /// A scorer for <paramref name="model"/>, optionally against <paramref name="reference"/> (another loaded
    /// model with the same tokenizer; see <see cref="CheckReference"/>). <paramref name="topK"/>: alternatives
    /// reported per position (0..<see cref="VocabStats.MaxTopK"/>).
    /// </summary>
    public Scorer(LanguageModel model, LanguageModel? reference = null, int topK = 0)
    {
        ArgumentNullException.ThrowIfNull(model);
        if ((uint)topK > VocabStats.MaxTopK)
        {
            throw new InvalidParameterException("top-k", $"{topK} (must be 0..{VocabStats.MaxTopK})");
        }
        if (ReferenceEquals(model, reference))
        {
            throw new InvalidParameterException("reference", "is the scored model itself (one sequence state cannot run both; load the folder a second time)");
        }
        _model = model;
        _reference = reference;
        _topK = topK;
        int vocabulary = model.Config.VocabularySize;
        _width = vocabulary;
        Capacity = model.Model.ContextLength;
        ChunkLength = model.Model.Options.PrefillChunk;
        if (reference is not null)
        {
            _width = CheckReference(model, reference);
            Capacity = Math.Min(Capacity, reference.Model.ContextLength);
            ChunkLength = Math.Min(ChunkLength, reference.Model.Options.PrefillChunk);
        }
        ChunkLength = Math.Max(1, Math.Min(ChunkLength, Capacity));
        _stats = new float[ChunkLength * VocabStats.FieldCount];
        _topIds = new int[ChunkLength * topK];
        _topLogProbs = new float[ChunkLength * topK];
        _logits = new NativeBuffer<float>((long)ChunkLength * vocabulary);
        try
        {
            _referenceLogits = reference is null ? null : new NativeBuffer<float>((long)ChunkLength * reference.Config.VocabularySize);
        }
        catch
        {
            _logits.Dispose();
            throw;
        }
    }

    /// <summary>Most tokens a text may have (the smaller context of the two models).</summary>
    public int Capacity { get; }

    /// <summary>Positions per forward pass and reduction.</summary>
    public int ChunkLength { get; }

    /// <summary>Columns the reduction sees: the model's vocabulary, or the tokenizer's when the two LM heads differ in padding.</summary>
    public int ReductionWidth => _width;

    public bool HasReference => _reference is not null;

    /// <summary>Bytes of the scorer's own buffers.</summary>
    public long ByteLength => _logits.ByteLength + (_referenceLogits?.ByteLength ?? 0)
        + sizeof(float) * ((long)_stats.Length + _topLogProbs.Length) + sizeof(int) * (long)_topIds.Length;

    public TextScore Score(string text)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return Score(_model.Encode(text));
    }

    public TextScore Score(int[] ids)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(ids);
        if (ids.Length < 2)
        {
            throw new InvalidParameterException("text", $"encodes to {ids.Length} token(s); scoring needs at least 2");
        }
        if (ids.Length > Capacity)
        {
            throw new ContextLengthException($"the text is {ids.Length} tokens; the context holds {Capacity}");
        }
        foreach (int id in ids)
        {
            if ((uint)id >= (uint)_width)
            {
                throw new InvalidParameterException("token", $"id {id} is outside the vocabulary of {_width}");
            }
        }

        if (_reference is null)
        {
            using var lease = _model.LeaseSession();
            return ScoreLeased(ids, lease.Session, null);
        }
        // Lease in load order: two scorers over the same pair in opposite roles must not deadlock.
        bool modelFirst = _model.LoadOrder < _reference.LoadOrder;
        using var first = (modelFirst ? _model : _reference).LeaseSession();
        using var second = (modelFirst ? _reference : _model).LeaseSession();
        return ScoreLeased(ids, modelFirst ? first.Session : second.Session, modelFirst ? second.Session : first.Session);
    }

    private TextScore ScoreLeased(int[] ids, IDecoderSession session, IDecoderSession? referenceSession)
    {
        int modelVocabulary = _model.Config.VocabularySize;
        int referenceVocabulary = _reference?.Config.VocabularySize ?? 0;
        var positions = new TokenScore[ids.Length - 1];
        session.Reset();
        referenceSession?.Reset();
        for (int start = 0; start < ids.Length - 1; start += ChunkLength)
        {
            int count = Math.Min(ChunkLength, ids.Length - 1 - start);
            var chunk = ids.AsSpan(start, count);
            bool pairs = referenceSession is null || (session is IDeviceReduction withReference && referenceSession is IDeviceReduction referenceDevice
                && withReference.CanReduceWith(referenceDevice));
            if (pairs && session is IDeviceReduction { CanReduce: true } device && _width == modelVocabulary)
            {
                // The logits stay on the device: the reduction runs there and only its numbers come back.
                var deviceStats = _stats.AsSpan(0, count * VocabStats.FieldCount);
                var deviceTopIds = _topIds.AsSpan(0, count * _topK);
                var deviceTopLogProbs = _topLogProbs.AsSpan(0, count * _topK);
                if (referenceSession is IDeviceReduction referenceReduction)
                {
                    device.ForwardReduce(chunk, ids.AsSpan(start + 1, count), referenceReduction, _topK, deviceStats, deviceTopIds, deviceTopLogProbs);
                }
                else
                {
                    device.ForwardReduce(chunk, ids.AsSpan(start + 1, count), _topK, deviceStats, deviceTopIds, deviceTopLogProbs);
                }
                for (int t = 0; t < count; t++)
                {
                    int position = start + t + 1;
                    positions[position - 1] = Read(position, ids[position], deviceStats.Slice(t * VocabStats.FieldCount, VocabStats.FieldCount),
                        deviceTopIds.Slice(t * _topK, _topK), deviceTopLogProbs.Slice(t * _topK, _topK));
                }
                continue;
            }
            var logits = _logits.Span[..(count * modelVocabulary)];
            session.Forward(chunk, logits, allPositions: true);
            Compact(logits, count, modelVocabulary, _width);
            Span<float> reference = default;
            if (referenceSession is not null)
            {
                reference = _referenceLogits!.Span[..(count * referenceVocabulary)];
                referenceSession.Forward(chunk, reference, allPositions: true);
                Compact(reference, count, referenceVocabulary, _width);
                reference = reference[..(count * _width)];
            }
            var stats = _stats.AsSpan(0, count * VocabStats.FieldCount);
            var topIds = _topIds.AsSpan(0, count * _topK);
            var topLogProbs = _topLogProbs.AsSpan(0, count * _topK);
            VocabStats.Reduce(logits[..(count * _width)], _width, ids.AsSpan(start + 1, count), reference, _topK, stats, topIds, topLogProbs);
            for (int t = 0; t < count; t++)
            {
                int position = start + t + 1;
                positions[position - 1] = Read(position, ids[position], stats.Slice(t * VocabStats.FieldCount, VocabStats.FieldCount),
                    topIds.Slice(t * _topK, _topK), topLogProbs.Slice(t * _topK, _topK));
            }
        }
        return new TextScore(ids, positions, _reference is not null);
    }

    private static TokenScore Read(int position, int token, ReadOnlySpan<float> stats, ReadOnlySpan<int> topIds, ReadOnlySpan<float> topLogProbs)
    {
        IReadOnlyList<TokenAlternative> top = [];
        if (!topIds.IsEmpty)
        {
            var list = new List<TokenAlternative>(topIds.Length);
            for (int i = 0; i < topIds.Length && topIds[i] >= 0; i++)
            {
                list.Add(new TokenAlternative(topIds[i], topLogProbs[i]));
            }
            top = list;
        }
        return new TokenScore(position, token, stats[(int)VocabStatsField.TokenLogProb], stats[(int)VocabStatsField.Entropy],
            stats[(int)VocabStatsField.Kurtosis], stats[(int)VocabStatsField.Margin], stats[(int)VocabStatsField.KlPq],
            stats[(int)VocabStatsField.KlQp], stats[(int)VocabStatsField.TokenLogRatio], top);
    }

    /// <summary>
    /// Rows [rows, stride] → [rows, width] in place (width &lt;= stride): row r moves from r x stride to r x width.
    /// Destinations never lie after their sources, so copying rows in order (memmove within a row) is safe.
    /// </summary>
    private static void Compact(Span<float> logits, int rows, int stride, int width)
    {
        if (stride == width)
        {
            return;
        }
        for (int r = 1; r < rows; r++)
        {
            logits.Slice(r * stride, width).CopyTo(logits.Slice(r * width, width));
        }
    }

    /// <summary>
    /// Checks that <paramref name="reference"/> reads token ids like <paramref name="model"/> and returns the
    /// number of vocabulary columns to reduce over. The two tokenizer.json id → token tables (model vocabulary
    /// plus added tokens) must be equal, and both models must encode a probe text to the same ids (BOS handling
    /// and the post-processor template). The config vocab_size (LM head rows) may differ only in padding: rows past
    /// the tokenizer's vocabulary, which no text encodes to. Then both rows are cut to the tokenizer's vocabulary
    /// before the reduction, so p and q are distributions over the same tokens. (Cutting rather than setting the
    /// padding to -inf: the reduction needs both rows at one width anyway, and masked entries would still count
    /// in the V of the kurtosis' moments, making it depend on how much padding a head has.)
    /// </summary>
    public static int CheckReference(LanguageModel model, LanguageModel reference) => CheckReference(model, reference, "reference");

    /// <summary>As <see cref="CheckReference(LanguageModel, LanguageModel)"/>, naming <paramref name="parameter"/> in its errors
    /// (a composition's members: "compose").</summary>
    public static int CheckReference(LanguageModel model, LanguageModel reference, string parameter)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(reference);
        var mine = model.HfTokenizer;
        var theirs = reference.HfTokenizer;
        int difference = mine.Vocabulary.FirstDifference(theirs.Vocabulary);
        if (difference >= 0)
        {
            throw new InvalidParameterException(parameter,
                $"{reference.Directory} does not share the tokenizer of {model.Directory}: token id {difference} is "
                + $"{Describe(mine.Vocabulary[difference])} in {mine.FilePath} but {Describe(theirs.Vocabulary[difference])} in {theirs.FilePath}");
        }
        int[] mineProbe = mine.Encode(TokenizerProbe);
        int[] theirsProbe = theirs.Encode(TokenizerProbe);
        if (!mineProbe.AsSpan().SequenceEqual(theirsProbe))
        {
            throw new InvalidParameterException(parameter,
                $"{reference.Directory} does not tokenize like {model.Directory} (same vocabulary; BOS handling: bos_token_id "
                + $"{Describe(mine.BosTokenId)}, add_bos_token {Describe(mine.AddBos)} in {model.Directory}, bos_token_id {Describe(theirs.BosTokenId)}, "
                + $"add_bos_token {Describe(theirs.AddBos)} in {reference.Directory}): \"{TokenizerProbe}\" encodes to "
                + $"[{string.Join(", ", mineProbe)}] against [{string.Join(", ", theirsProbe)}]");
        }
        int modelVocabulary = model.Config.VocabularySize;
        int referenceVocabulary = reference.Config.VocabularySize;
        if (modelVocabulary == referenceVocabulary)
        {
            return modelVocabulary;
        }
        int tokenizerVocabulary = mine.Vocabulary.Size;
        if (Math.Min(modelVocabulary, referenceVocabulary) < tokenizerVocabulary)
        {
            throw new InvalidParameterException(parameter,
                $"vocab_size {modelVocabulary} in {model.Directory} and {referenceVocabulary} in {reference.Directory} differ, and not only "
                + $"by padding rows past the tokenizer's {tokenizerVocabulary} tokens");
        }
        return tokenizerVocabulary;
    }

    private static string Describe(string? token) => token is null ? "absent" : $"\"{token}\"";

    private static string Describe<T>(T? value) where T : struct => value?.ToString()?.ToLowerInvariant() ?? "none";

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        _logits.Dispose();
        _referenceLogits?.Dispose();
    }
}
