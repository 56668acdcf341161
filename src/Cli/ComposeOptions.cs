using System.CommandLine;
using System.Globalization;
using KernelLM.Models;
using KernelLM.Models.Composition;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Cli;

/// <summary>
/// Logit composition on run and generate (docs/composition.md): `--compose MODULE[:WEIGHT]` (repeatable; the model adds
/// WEIGHT x the module's logits, default 1), `--guidance-negative-prompt TEXT --guidance-scale S` (classifier-free
/// guidance: a second sequence of the same model on TEXT), `--contrastive-amateur DIR [--contrastive-alpha A]`
/// (contrastive decoding). One kind per run. The values and folders are checked before any model loads.
/// </summary>
public sealed class ComposeOptions
{
    public Option<string[]> Compose { get; } = new("--compose")
    {
        Description = "Add a module's logits to the model's: MODULE[:WEIGHT] (a model folder with the same tokenizer; weight default 1, may be negative; repeatable)",
        AllowMultipleArgumentsPerToken = false,
    };

    public Option<string?> NegativePrompt { get; } = new("--guidance-negative-prompt")
    {
        Description = "Classifier-free guidance: the unconditional sequence's prompt (uncond + S x (cond - uncond))",
    };

    public Option<float?> GuidanceScale { get; } = new("--guidance-scale") { Description = "Guidance scale S (default 1.5; 1 = the conditional model alone)" };

    public Option<string?> Amateur { get; } = new("--contrastive-amateur")
    {
        Description = "Contrastive decoding: log p_model - log p_amateur over the model's plausible tokens (a model folder with the same tokenizer)",
    };

    public Option<float?> Alpha { get; } = new("--contrastive-alpha") { Description = "Contrastive decoding's plausibility cut: keep p >= alpha x max p (default 0.1)" };

    public void AddTo(Command command)
    {
        command.Options.Add(Compose);
        command.Options.Add(NegativePrompt);
        command.Options.Add(GuidanceScale);
        command.Options.Add(Amateur);
        command.Options.Add(Alpha);
    }

    /// <summary>The requested composition, checked; null when none was asked for.</summary>
    public ComposeRequest? Read(ParseResult result)
    {
        var modules = (result.GetValue(Compose) ?? []).Select(ParseModule).ToArray();
        string? negative = result.GetValue(NegativePrompt);
        float? scale = result.GetValue(GuidanceScale);
        string? amateur = result.GetValue(Amateur);
        float? alpha = result.GetValue(Alpha);
        if (scale is not null && negative is null)
        {
            throw new InvalidParameterException("--guidance-scale", "needs --guidance-negative-prompt (the unconditional sequence)");
        }
        if (alpha is not null && amateur is null)
        {
            throw new InvalidParameterException("--contrastive-alpha", "needs --contrastive-amateur");
        }
        int kinds = (modules.Length > 0 ? 1 : 0) + (negative is not null ? 1 : 0) + (amateur is not null ? 1 : 0);
        if (kinds == 0)
        {
            return null;
        }
        if (kinds > 1)
        {
            throw new InvalidParameterException("--compose", "--compose, --guidance-negative-prompt and --contrastive-amateur are separate kinds of composition: use one");
        }
        if (scale is { } s && !float.IsFinite(s))
        {
            throw new InvalidParameterException("--guidance-scale", $"{s} (must be a finite number)");
        }
        if (alpha is { } a && !(a > 0 && a <= 1))
        {
            throw new InvalidParameterException("--contrastive-alpha", $"{a} (must be in (0, 1])");
        }
        if (amateur is not null)
        {
            RequireFolder("--contrastive-amateur", amateur);
        }
        return new ComposeRequest(modules, negative, scale ?? 1.5f, amateur, alpha ?? 0.1f);
    }

    /// <summary>MODULE[:WEIGHT]: the text after the last ':' is the weight when it is a number, else part of the folder.</summary>
    public static (string Directory, float Weight) ParseModule(string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        string directory = value;
        float weight = 1;
        int colon = value.LastIndexOf(':');
        if (colon >= 0 && float.TryParse(value.AsSpan(colon + 1), NumberStyles.Float, CultureInfo.InvariantCulture, out float parsed))
        {
            directory = value[..colon];
            weight = parsed;
            if (!float.IsFinite(weight))
            {
                throw new InvalidParameterException("--compose", $"'{value}': the weight must be a finite number");
            }
        }
        RequireFolder("--compose", directory);
        return (directory, weight);
    }

    private static void RequireFolder(string option, string directory)
    {
        if (string.IsNullOrEmpty(directory) || !Directory.Exists(directory))
        {
            throw new InvalidParameterException(option, $"'{directory}' is not a model folder (no such directory)");
        }
    }
}

/// <summary>A checked composition request: build it on the loaded model.</summary>
public sealed record ComposeRequest(IReadOnlyList<(string Directory, float Weight)> Modules, string? NegativePrompt, float GuidanceScale, string? Amateur,
    float Alpha)
{
    /// <summary>Loads the other members with <paramref name="load"/> (onto the model's device) and composes them with
    /// <paramref name="model"/>; the result owns the models it loaded.</summary>
    public ComposedGeneration Build(LanguageModel model, Func<string, LanguageModel> load)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(load);
        var loaded = new List<LanguageModel>();
        try
        {
            LogitComposition composition;
            string description;
            if (NegativePrompt is not null)
            {
                composition = LogitComposition.Guidance(model, NegativePrompt, GuidanceScale);
                description = string.Create(CultureInfo.InvariantCulture, $"guidance, scale {GuidanceScale}");
            }
            else if (Amateur is not null)
            {
                loaded.Add(load(Amateur));
                composition = LogitComposition.Contrastive(model, loaded[0], Alpha);
                description = string.Create(CultureInfo.InvariantCulture, $"contrastive, amateur {Amateur}, alpha {Alpha}");
            }
            else
            {
                foreach (var (directory, _) in Modules)
                {
                    loaded.Add(load(directory));
                }
                composition = LogitComposition.Sum(model, Modules.Select((m, i) => (loaded[i], m.Weight)));
                description = "sum: model" + string.Concat(Modules.Select(m => string.Create(CultureInfo.InvariantCulture, $" + {m.Weight} x {m.Directory}")));
            }
            return new ComposedGeneration(composition, loaded, description + (composition.OnDevice ? ", summed on the device" : ""));
        }
        catch
        {
            loaded.ForEach(m => m.Dispose());
            throw;
        }
    }
}

/// <summary>A composition and the member models loaded for it, disposed together.</summary>
public sealed class ComposedGeneration(LogitComposition composition, IReadOnlyList<LanguageModel> loaded, string description) : IDisposable
{
    public LogitComposition Composition => composition;

    public string Description => description;

    public IEnumerable<GeneratedToken> Generate(string prompt, GenerationOptions options, GenerationStats stats, CancellationToken cancellation) =>
        composition.Generate(prompt, options, stats, cancellation);

    public void Dispose()
    {
        composition.Dispose();
        foreach (var model in loaded)
        {
            model.Dispose();
        }
    }
}
