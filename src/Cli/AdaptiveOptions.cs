using System.CommandLine;
using System.Globalization;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Cli;

/// <summary>
/// `--adaptive-decoding [threshold=H|auto] [beams=B] [lookahead=L]` and `--draft-model DIR --route-entropy H` on run
/// and generate (docs/adaptive-decoding.md). Checked before the model loads, except `threshold=auto`, which reads the
/// calibrated threshold beside the model (<see cref="EntropyCalibration.FileName"/>) and fails naming that file.
/// </summary>
public sealed class AdaptiveOptions
{
    public Option<string[]> Adaptive { get; } = new("--adaptive-decoding")
    {
        Description = "Greedy where the entropy is below the threshold, else rerank the top beams by a greedy lookahead: "
            + "[threshold=H|auto] [beams=3] [lookahead=5] (auto: the threshold calibrate-entropy saved beside the model; the default)",
        Arity = ArgumentArity.ZeroOrMore,
        AllowMultipleArgumentsPerToken = true,
    };

    public Option<string> DraftModel { get; } = new("--draft-model")
    {
        Description = "Small model folder (same tokenizer) that proposes every token; the --model takes over where its entropy is above --route-entropy",
    };

    public Option<float?> RouteEntropy { get; } = new("--route-entropy")
    {
        Description = "With --draft-model: entropy (nats) of the small model above which the large model produces the token",
    };

    public Option<string> RouteAfter { get; } = new("--route-after")
    {
        Description = "With --draft-model: after the text ends with this delimiter (escapes such as \\n are read), the large model produces the next --route-tokens tokens",
    };

    public Option<int> RouteTokens { get; } = new("--route-tokens")
    {
        Description = "With --route-after: tokens the large model produces after the delimiter",
    };

    public void AddTo(Command command)
    {
        command.Options.Add(Adaptive);
        command.Options.Add(DraftModel);
        command.Options.Add(RouteEntropy);
        command.Options.Add(RouteAfter);
        command.Options.Add(RouteTokens);
    }

    /// <summary>Whether --adaptive-decoding was given (with or without settings).</summary>
    public bool AdaptiveRequested(ParseResult result) => result.GetResult(Adaptive) is not null;

    /// <summary>The adaptive-decoding options, or null when the option is absent; `auto` reads the model's threshold file.</summary>
    public AdaptiveDecodingOptions? ReadAdaptive(ParseResult result, string modelDirectory)
    {
        if (!AdaptiveRequested(result))
        {
            return null;
        }
        var settings = Parse(result.GetValue(Adaptive) ?? []);
        var options = new AdaptiveDecodingOptions
        {
            Threshold = settings.Threshold ?? 0,
            Beams = settings.Beams ?? AdaptiveDecodingOptions.DefaultBeams,
            Lookahead = settings.Lookahead ?? AdaptiveDecodingOptions.DefaultLookahead,
        };
        options.Validate();
        // auto: the threshold calibrate-entropy saved beside the model.
        return settings.Threshold is null ? options with { Threshold = EntropyCalibration.Read(EntropyCalibration.PathFor(modelDirectory)).Threshold } : options;
    }

    /// <summary>The routing options, or null without --draft-model; the draft's folder must exist.</summary>
    public (string Directory, RoutingOptions Options)? ReadRouting(ParseResult result)
    {
        string? draft = result.GetValue(DraftModel);
        float? entropy = result.GetValue(RouteEntropy);
        string? after = result.GetValue(RouteAfter);
        int tokens = result.GetValue(RouteTokens);
        if (draft is null)
        {
            if (entropy is not null || after is not null || tokens != 0)
            {
                throw new InvalidParameterException(entropy is not null ? "--route-entropy" : after is not null ? "--route-after" : "--route-tokens", "goes with --draft-model");
            }
            return null;
        }
        if ((after is null) != (tokens == 0))
        {
            throw new InvalidParameterException(after is null ? "--route-tokens" : "--route-after", "--route-after and --route-tokens go together");
        }
        if (entropy is null)
        {
            throw new InvalidParameterException("--route-entropy", "--draft-model needs it (the small model's entropy in nats above which the large model takes over)");
        }
        if (!Directory.Exists(draft))
        {
            throw new InvalidParameterException("--draft-model", $"{draft}: no such folder");
        }
        string? delimiter;
        try
        {
            delimiter = after is null ? null : System.Text.RegularExpressions.Regex.Unescape(after);
        }
        catch (ArgumentException error)
        {
            throw new InvalidParameterException("--route-after", $"'{after}': {error.Message}");
        }
        var options = new RoutingOptions { EntropyThreshold = entropy.Value, HandoverDelimiter = delimiter, HandoverTokens = tokens };
        options.Validate();
        return (draft, options);
    }

    /// <summary>One line per feature used: how many tokens each model produced; where the lookahead ran.</summary>
    public static void WriteSummary(TextWriter output, GenerationStats stats, AdaptiveDecodingOptions? adaptive, RoutingStats? routing)
    {
        if (routing is not null)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[routing: small model {routing.SmallTokens} tokens, large model {routing.LargeTokens} tokens ({routing.HandoverTokens} after a delimiter; {routing.CatchUpTokens} tokens prefilled to catch up)]"));
        }
        if (adaptive is not null && stats.Adaptive is { } done)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[adaptive decoding: threshold {adaptive.Threshold:F3} nats, lookahead at {done.LookaheadSteps} of {done.Steps} steps (beams {adaptive.Beams}, lookahead {adaptive.Lookahead}), {done.ChangedTokens} tokens changed, {done.RolloutForwards} rollout forward passes]"));
        }
    }

    /// <summary>The settings given as key=value; null for the ones left out (threshold=auto is null too).</summary>
    public static (float? Threshold, int? Beams, int? Lookahead) Parse(IReadOnlyList<string> values)
    {
        float? threshold = null;
        int? beams = null, lookahead = null;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (string value in values)
        {
            int equals = value.IndexOf('=', StringComparison.Ordinal);
            if (equals < 0)
            {
                throw new InvalidParameterException("--adaptive-decoding", $"'{value}' has no '=' (expected threshold=H|auto, beams=B or lookahead=L)");
            }
            string key = value[..equals].ToLowerInvariant();
            string setting = value[(equals + 1)..];
            if (!seen.Add(key))
            {
                throw new InvalidParameterException("--adaptive-decoding", $"'{key}' is given twice");
            }
            switch (key)
            {
                case "threshold":
                    if (setting.Equals("auto", StringComparison.OrdinalIgnoreCase))
                    {
                        break;
                    }
                    if (!float.TryParse(setting, NumberStyles.Float, CultureInfo.InvariantCulture, out float parsed) || !float.IsFinite(parsed) || parsed < 0)
                    {
                        throw new InvalidParameterException("--adaptive-decoding", $"'{value}': the threshold must be auto or an entropy >= 0 (nats)");
                    }
                    threshold = parsed;
                    break;
                case "beams":
                    beams = Integer(value, setting);
                    break;
                case "lookahead":
                    lookahead = Integer(value, setting);
                    break;
                default:
                    throw new InvalidParameterException("--adaptive-decoding", $"'{value}': unknown setting '{key}' (expected threshold, beams or lookahead)");
            }
        }
        return (threshold, beams, lookahead);
    }

    private static int Integer(string value, string setting) =>
        int.TryParse(setting, NumberStyles.Integer, CultureInfo.InvariantCulture, out int parsed)
            ? parsed
            : throw new InvalidParameterException("--adaptive-decoding", $"'{value}': not a whole number");
}
