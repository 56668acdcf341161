using System.Globalization;

namespace KernelLM.Runtime.KvSelect;

/// <summary>Where the selected keys sit for RoPE (docs/kv-select.md, "Position modes").</summary>
public enum KvSelectPositions
{
    /// <summary>Keys stored with RoPE at their true positions (the cache as without selection).</summary>
    Standard,

    /// <summary>Keys stored before RoPE, rotated inside attention at positions 0..|selected|-1 (the query at the last);
    /// selection scores unrotated queries and keys.</summary>
    Compacted,
}

/// <summary>
/// TokenSelect options (docs/kv-select.md): per layer and step, keep the <see cref="TopK"/> cached tokens with the
/// largest soft vote of the heads' Q.K distributions, plus the first <see cref="Initial"/> and the last
/// <see cref="Local"/>; attention runs over that set. While the context is no longer than
/// <see cref="MaxIndices"/> nothing is selected (full attention). A step whose query has cosine similarity at least
/// <see cref="CacheThreshold"/> to the query of the layer's last selection reuses that selection (1 disables the cache).
/// Prefill chunks of <see cref="Chunk"/> tokens select with the chunk's mean query.
/// </summary>
public sealed record KvSelectOptions
{
    /// <summary>The largest top-k the device kernels and the CPU accept.</summary>
    public const int MaxTopK = 8192;

    public int TopK { get; init; } = 2048;

    public int Initial { get; init; } = 128;

    public int Local { get; init; } = 512;

    public float CacheThreshold { get; init; } = 0.9f;

    public KvSelectPositions Positions { get; init; } = KvSelectPositions.Standard;

    /// <summary>Prompt tokens per prefill chunk while selection is on (each chunk selects once).</summary>
    public int Chunk { get; init; } = 512;

    /// <summary>Positions a selection lists: init + top-k + local (the width of the index list).</summary>
    public int MaxIndices => Initial + TopK + Local;

    /// <summary>Whether the cache can be hit at all (a threshold of 1 or more turns it off).</summary>
    public bool UsesCache => CacheThreshold < 1f;

    /// <summary>Whether a step over <paramref name="context"/> positions selects (else: full attention).</summary>
    public bool Selects(int context) => context > MaxIndices;

    public void Validate()
    {
        if (TopK < 1 || TopK > MaxTopK)
        {
            throw new InvalidParameterException("kv-select", $"k={TopK} (must be in 1..{MaxTopK})");
        }
        if (Initial < 0)
        {
            throw new InvalidParameterException("kv-select", $"init={Initial} (must be >= 0)");
        }
        if (Local < 1)
        {
            throw new InvalidParameterException("kv-select", $"local={Local} (must be >= 1: decoding attends to its own position through it)");
        }
        if (!(CacheThreshold >= -1f && CacheThreshold <= 1f))
        {
            throw new InvalidParameterException("kv-select", $"cache={CacheThreshold.ToString(CultureInfo.InvariantCulture)} (a cosine threshold in [-1, 1]; 1 disables the cache)");
        }
        if (Chunk < 1)
        {
            throw new InvalidParameterException("kv-select", $"chunk={Chunk} (must be >= 1)");
        }
    }

    /// <summary>
    /// Parses <c>k=2048,init=128,local=512,cache=0.9,positions=standard|compacted,chunk=512</c> (any subset, any order;
    /// "on" or an empty text: the defaults) and validates the result.
    /// </summary>
    public static KvSelectOptions Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var options = new KvSelectOptions();
        if (text.Trim() is "" or "on")
        {
            return options;
        }
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (string part in text.Split(',', StringSplitOptions.TrimEntries))
        {
            int equals = part.IndexOf('=', StringComparison.Ordinal);
            if (equals <= 0)
            {
                throw new InvalidParameterException("kv-select", $"'{part}' in '{text}' is not key=value (keys: k, init, local, cache, positions, chunk)");
            }
            string key = part[..equals].Trim();
            string value = part[(equals + 1)..].Trim();
            if (!seen.Add(key))
            {
                throw new InvalidParameterException("kv-select", $"'{key}' is given twice in '{text}'");
            }
            options = key switch
            {
                "k" => options with { TopK = Integer(key, value) },
                "init" => options with { Initial = Integer(key, value) },
                "local" => options with { Local = Integer(key, value) },
                "chunk" => options with { Chunk = Integer(key, value) },
                "cache" => options with { CacheThreshold = Number(key, value) },
                "positions" => options with
                {
                    Positions = value switch
                    {
                        "standard" => KvSelectPositions.Standard,
                        "compacted" => KvSelectPositions.Compacted,
                        _ => throw new InvalidParameterException("kv-select", $"positions={value} (one of: standard, compacted)"),
                    },
                },
                _ => throw new InvalidParameterException("kv-select", $"unknown key '{key}' in '{text}' (keys: k, init, local, cache, positions, chunk)"),
            };
        }
        options.Validate();
        return options;
    }

    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture,
            $"k={TopK},init={Initial},local={Local},cache={CacheThreshold},positions={Positions.ToString().ToLowerInvariant()},chunk={Chunk}");

    private static int Integer(string key, string value) =>
        int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int result)
            ? result
            : throw new InvalidParameterException("kv-select", $"{key}={value} is not an integer");

    private static float Number(string key, string value) =>
        float.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out float result)
            ? result
            : throw new InvalidParameterException("kv-select", $"{key}={value} is not a number");
}

/// <summary>Counts of a selector since its last reset, summed over layers (and sequences): <see cref="Selections"/> new
/// selections, <see cref="CacheHits"/> steps that reused the cached one. Steps too short to select are not counted (on
/// the device they may run inside a replayed CUDA graph, where the host sees nothing).</summary>
public readonly record struct KvSelectStatistics(long Selections, long CacheHits)
{
    /// <summary>Hits over the steps that could have hit (selections + hits); 0 when there were none.</summary>
    public double HitRate => Selections + CacheHits == 0 ? 0 : (double)CacheHits / (Selections + CacheHits);
}
