using KernelLM.Models.Llama;
using KernelLM.Models.Tokenization;

namespace KernelLM.Bench;

/// <summary>The embedded tiny-stories model (5.2M-parameter Llama, bf16) and a real prompt for it.</summary>
public static class EmbeddedModel
{
    private static readonly Lazy<string> s_directory = new(Locate);
    private static readonly Lazy<int[]> s_corpusTokens = new(TokenizeCorpus);
    private static readonly Lazy<long> s_bytesPerDecodedToken = new(ReadBytesPerDecodedToken);

    /// <summary>models/tiny-stories next to the executable (copied by the build), else the repository's copy,
    /// found by walking up from <see cref="AppContext.BaseDirectory"/> to the folder holding KernelLM.sln.</summary>
    public static string Directory => s_directory.Value;

    /// <summary><see cref="LlamaModel.BytesPerDecodedToken"/> of the embedded model (every layer matrix plus the LM head).</summary>
    public static long BytesPerDecodedToken => s_bytesPerDecodedToken.Value;

    /// <summary>The first <paramref name="count"/> tokens (BOS first) of the model's sample stories.</summary>
    public static int[] PromptTokens(int count)
    {
        int[] all = s_corpusTokens.Value;
        if (all.Length < count)
        {
            throw new InvalidOperationException($"the sample corpus encodes to {all.Length} tokens, fewer than the {count} asked for");
        }
        return all[..count];
    }

    public static LlamaModel Load(int threads, int contextLength) =>
        LlamaModel.Load(Directory, new ModelLoadOptions { Device = "cpu", Threads = threads, ContextLength = contextLength });

    private static string Locate()
    {
        string besideExecutable = Path.Combine(AppContext.BaseDirectory, "models", "tiny-stories");
        if (File.Exists(Path.Combine(besideExecutable, "config.json")))
        {
            return besideExecutable;
        }
        for (var folder = new DirectoryInfo(AppContext.BaseDirectory); folder is not null; folder = folder.Parent)
        {
            if (File.Exists(Path.Combine(folder.FullName, "KernelLM.sln")))
            {
                string inRepository = Path.Combine(folder.FullName, "models", "tiny-stories");
                if (File.Exists(Path.Combine(inRepository, "config.json")))
                {
                    return inRepository;
                }
            }
        }
        throw new DirectoryNotFoundException(
            $"models/tiny-stories was found neither next to {AppContext.BaseDirectory} nor under a folder above it that holds KernelLM.sln");
    }

    private static int[] TokenizeCorpus()
    {
        string directory = Directory;
        var config = Models.ModelConfig.Load(directory);
        string text = File.ReadAllText(Path.Combine(directory, "corpus", "sample_stories.txt"));
        using var tokenizer = HfTokenizer.Load(directory, config.BosTokenId, config.EosTokenIds);
        return tokenizer.Encode(text);
    }

    private static long ReadBytesPerDecodedToken()
    {
        using var model = LlamaModel.Load(Directory, new ModelLoadOptions { Device = "cpu", Threads = 1, ContextLength = 16, Prefetch = false });
        return model.BytesPerDecodedToken;
    }
}
