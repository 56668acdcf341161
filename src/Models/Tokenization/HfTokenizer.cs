using System.Text.Json;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Models.Tokenization;

/// <summary>
/// A model's tokenizer.json through the Hugging Face tokenizers library (Tokenizers.DotNet). The library
/// always applies the tokenizer's post-processor template; BOS is then made to follow the model's
/// tokenizer_config.json (add_bos_token), which is what transformers does. Decoding skips special tokens.
/// The native tokenizer is used under a lock (its thread-safety is not documented).
/// </summary>
public sealed class HfTokenizer : ITextTokenizer, IDisposable
{
    private readonly Tokenizers.DotNet.Tokenizer _tokenizer;
    private readonly object _gate = new();
    private readonly Lazy<TokenizerVocabulary> _vocabulary;

    private HfTokenizer(string filePath, Tokenizers.DotNet.Tokenizer tokenizer, int? bosTokenId, bool? addBos, IReadOnlyList<int> eos)
    {
        FilePath = filePath;
        _tokenizer = tokenizer;
        _vocabulary = new Lazy<TokenizerVocabulary>(() => TokenizerVocabulary.Read(filePath));
        BosTokenId = bosTokenId;
        AddBos = addBos;
        EosTokenIds = eos;
    }

    /// <summary>The tokenizer.json this was loaded from.</summary>
    public string FilePath { get; }

    /// <summary>The id → token table (model vocabulary plus added tokens) and its fingerprint; read from
    /// tokenizer.json on first use (comparing two models' tokenizers), not at load.</summary>
    public TokenizerVocabulary Vocabulary => _vocabulary.Value;

    public int? BosTokenId { get; }

    /// <summary>tokenizer_config.json's add_bos_token; null when it does not say (the template decides).</summary>
    public bool? AddBos { get; }

    public IReadOnlyList<int> EosTokenIds { get; }

    public static HfTokenizer Load(string directory, int? bosTokenId, IReadOnlyList<int> eosTokenIds)
    {
        string path = Path.Combine(directory, "tokenizer.json");
        if (!File.Exists(path))
        {
            throw new ModelConfigException($"tokenizer.json not found in model folder {directory}");
        }
        bool? addBos = null;
        string configPath = Path.Combine(directory, "tokenizer_config.json");
        if (File.Exists(configPath))
        {
            try
            {
                using var document = JsonDocument.Parse(File.ReadAllBytes(configPath));
                if (document.RootElement.TryGetProperty("add_bos_token", out var value) && value.ValueKind is JsonValueKind.True or JsonValueKind.False)
                {
                    addBos = value.GetBoolean();
                }
            }
            catch (JsonException error)
            {
                throw new ModelConfigException($"{configPath}: not valid JSON: {error.Message}", error);
            }
        }
        Tokenizers.DotNet.Tokenizer tokenizer;
        try
        {
            tokenizer = new Tokenizers.DotNet.Tokenizer(path);
        }
        catch (Tokenizers.DotNet.TokenizerException error)
        {
            throw new ModelConfigException($"{path}: the tokenizers library cannot load it: {error.Message}", error);
        }
        return new HfTokenizer(path, tokenizer, bosTokenId, addBos, eosTokenIds);
    }

    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        uint[] raw;
        lock (_gate)
        {
            raw = _tokenizer.Encode(text);
        }
        var ids = new List<int>(raw.Length + 1);
        foreach (uint id in raw)
        {
            ids.Add(checked((int)id));
        }
        if (BosTokenId is int bos)
        {
            bool hasBos = ids.Count > 0 && ids[0] == bos;
            bool wantBos = addSpecialTokens && (AddBos ?? hasBos);
            if (hasBos && !wantBos)
            {
                ids.RemoveAt(0);
            }
            else if (!hasBos && wantBos)
            {
                ids.Insert(0, bos);
            }
        }
        return [.. ids];
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var raw = new uint[ids.Length];
        for (int i = 0; i < ids.Length; i++)
        {
            raw[i] = checked((uint)ids[i]);
        }
        lock (_gate)
        {
            return _tokenizer.Decode(raw);
        }
    }

    public void Dispose() => _tokenizer.Dispose();
}
