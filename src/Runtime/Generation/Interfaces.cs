namespace KernelLM.Runtime.Generation;

/// <summary>
/// One sequence's view of a decoder: its KV cache and activations, allocated once at <see cref="Capacity"/>.
/// <see cref="Forward"/> appends tokens at positions Length.. and writes logits.
/// </summary>
public interface IDecoderSession : IDisposable
{
    int VocabularySize { get; }

    /// <summary>Most tokens the session's KV cache holds.</summary>
    int Capacity { get; }

    /// <summary>Tokens already in the KV cache.</summary>
    int Length { get; }

    /// <summary>Forgets the sequence (the next Forward starts at position 0).</summary>
    void Reset();

    /// <summary>
    /// Runs <paramref name="tokens"/> through the model at positions Length.. and appends them to the cache.
    /// logits: [vocabulary] for the last token only, or [tokens.Length, vocabulary] when
    /// <paramref name="allPositions"/>. Allocates nothing.
    /// </summary>
    void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false);
}

/// <summary>
/// A session on a device that can reduce its own logits where they are (the fused vocabulary reduction,
/// docs/token-signals.md), so that teacher-forced scoring copies back only the reduced numbers.
/// </summary>
public interface IDeviceReduction
{
    /// <summary>Whether <see cref="ForwardReduce"/> is available (e.g. not for f16 logits).</summary>
    bool CanReduce { get; }

    /// <summary>
    /// Runs <paramref name="tokens"/> like <see cref="IDecoderSession.Forward"/> with every position's logits, then
    /// reduces row t against <paramref name="targets"/>[t] on the device: stats [tokens, VocabStats.FieldCount],
    /// top ids / log-probs [tokens, topK]. The logits never leave the device.
    /// </summary>
    void ForwardReduce(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int topK, Span<float> stats, Span<int> topIds, Span<float> topLogProbs);

    /// <summary>Whether <paramref name="reference"/> keeps its logits on the same device, in the same dtype and width,
    /// so that <see cref="ForwardReduce(ReadOnlySpan{int}, ReadOnlySpan{int}, IDeviceReduction, int, Span{float}, Span{int}, Span{float})"/> can pair them.</summary>
    bool CanReduceWith(IDeviceReduction reference);

    /// <summary>As <see cref="ForwardReduce(ReadOnlySpan{int}, ReadOnlySpan{int}, int, Span{float}, Span{int}, Span{float})"/>,
    /// with <paramref name="reference"/> (another model's session on the same device) run over the same tokens and its
    /// rows reduced in the same pass: KL both ways and the log-ratio. One chunk: at most both sessions' prefill chunk.</summary>
    void ForwardReduce(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, IDeviceReduction reference, int topK, Span<float> stats,
        Span<int> topIds, Span<float> topLogProbs);
}

/// <summary>
/// A session that chooses the next token on its device, so that a decode step copies back only the token id and
/// the reduced numbers of its distribution (docs/token-signals.md), never the logits.
/// </summary>
public interface IDeviceSampler
{
    /// <summary>Whether <see cref="ForwardSample"/> is available (e.g. not for f16 logits).</summary>
    bool CanSample { get; }

    /// <summary>
    /// Runs <paramref name="feed"/> (and adds it to the device's token history for the repetition penalty), chooses
    /// the next token from the last position's logits with <paramref name="options"/> on the device (the draw:
    /// splitmix64 of <paramref name="seed"/> and the step, counted since <see cref="IDecoderSession.Reset"/>), and
    /// reduces the raw logits against the chosen id: stats [VocabStats.FieldCount], top ids / log-probs [topK].
    /// </summary>
    int ForwardSample(ReadOnlySpan<int> feed, Sampling.SamplingOptions options, ulong seed, int topK, Span<float> stats, Span<int> topIds,
        Span<float> topLogProbs);
}

/// <summary>Text to token ids and back, as the model's tokenizer files say.</summary>
public interface ITextTokenizer
{
    /// <summary>Ids for the text, with BOS prepended where the model's tokenizer config asks for it.</summary>
    int[] Encode(string text, bool addSpecialTokens = true);

    /// <summary>Text of the ids; special tokens are skipped.</summary>
    string Decode(ReadOnlySpan<int> ids);

    IReadOnlyList<int> EosTokenIds { get; }
}

/// <summary>The argument checks every decoder session's Forward makes, in one place.</summary>
public static class DecoderChecks
{
    /// <summary>Throws unless <paramref name="tokens"/> is non-empty, fits after <paramref name="length"/> tokens
    /// in <paramref name="capacity"/>, and every id is inside <paramref name="vocabulary"/>.</summary>
    public static void Tokens(ReadOnlySpan<int> tokens, int length, int capacity, int vocabulary)
    {
        if (tokens.IsEmpty)
        {
            throw new ArgumentException("forward needs at least one token", nameof(tokens));
        }
        if (length + tokens.Length > capacity)
        {
            throw new ContextLengthException(
                $"{length} tokens in the context plus {tokens.Length} new ones exceed its capacity of {capacity} tokens");
        }
        foreach (int token in tokens)
        {
            if ((uint)token >= (uint)vocabulary)
            {
                throw new InvalidParameterException("token", $"id {token} is outside the vocabulary of {vocabulary}");
            }
        }
    }

    /// <summary>Throws unless <paramref name="logitCount"/> holds the last row, or every row when <paramref name="allPositions"/>.</summary>
    public static void Logits(int logitCount, int tokens, int vocabulary, bool allPositions)
    {
        long needed = allPositions ? (long)tokens * vocabulary : vocabulary;
        if (logitCount < needed)
        {
            throw new ArgumentException($"logits must hold {needed} values ({(allPositions ? tokens : 1)} x vocabulary {vocabulary})", nameof(logitCount));
        }
    }
}
