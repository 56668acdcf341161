using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Generation;

/// <summary>
/// A decoder with synthetic logits: the next-token row is a fixed function of the whole token history (a hash of it
/// seeds the row), so a full recomputation and a cached, rolled-back run must agree exactly. Counts the tokens fed, so a
/// test can tell that nothing was recomputed. Rows have spreads from flat to peaked, so entropies vary.
/// </summary>
public sealed class ScriptedSession(int vocabulary, int capacity, Action<IReadOnlyList<int>, Span<float>>? logits = null)
    : IDecoderSession, ISessionRollback
{
    private readonly int[] _tokens = new int[capacity];
    private readonly Action<IReadOnlyList<int>, Span<float>> _logits = logits ?? HashedLogits;

    public int VocabularySize => vocabulary;
    public int Capacity => capacity;
    public int Length { get; private set; }

    /// <summary>Tokens run through Forward since creation (a prefix recomputation would show here).</summary>
    public int ForwardedTokens { get; private set; }

    public int Truncations { get; private set; }

    public void Reset() => Length = 0;

    public void Truncate(int length)
    {
        RollbackChecks.Length(length, Length);
        Length = length;
        Truncations++;
    }

    public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false)
    {
        if (allPositions)
        {
            throw new NotSupportedException();
        }
        DecoderChecks.Tokens(tokens, Length, capacity, vocabulary);
        tokens.CopyTo(_tokens.AsSpan(Length));
        Length += tokens.Length;
        ForwardedTokens += tokens.Length;
        _logits(new ArraySegment<int>(_tokens, 0, Length), logits[..vocabulary]);
    }

    /// <summary>The distribution after a whole history, computed from scratch (the oracle's view).</summary>
    public double[] Distribution(IReadOnlyList<int> history)
    {
        var row = new float[vocabulary];
        _logits(history, row);
        return AdaptiveDecodingOracle.LogSoftmax(row);
    }

    /// <summary>Row seeded by an FNV hash of the history: logit_v = spread x (u_v - 0.5) x 2, spread in [0.5, 8].</summary>
    public static void HashedLogits(IReadOnlyList<int> history, Span<float> logits)
    {
        ulong hash = 14695981039346656037UL;
        foreach (int token in history)
        {
            hash = (hash ^ (uint)token) * 1099511628211UL;
        }
        ulong state = hash;
        double spread = 0.5 + 7.5 * Next(ref state);
        for (int v = 0; v < logits.Length; v++)
        {
            logits[v] = (float)(spread * (Next(ref state) - 0.5) * 2);
        }
    }

    private static double Next(ref ulong state)
    {
        state += 0x9E3779B97F4A7C15UL;
        ulong z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return (z >> 11) * (1.0 / (1UL << 53));
    }

    public void Dispose()
    {
    }
}

/// <summary>Bytes as ids (<see cref="ByteTokenizer"/>) with the given EOS ids.</summary>
public sealed class EosByteTokenizer(params int[] eos) : ITextTokenizer
{
    private readonly ByteTokenizer _bytes = new();

    public IReadOnlyList<int> EosTokenIds { get; } = eos;

    public int[] Encode(string text, bool addSpecialTokens = true) => _bytes.Encode(text, addSpecialTokens);

    public string Decode(ReadOnlySpan<int> ids) => _bytes.Decode(ids);
}
