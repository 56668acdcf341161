using System.CommandLine;
using System.Globalization;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime.KvSelect;

namespace KernelLM.Cli;

/// <summary>
/// <c>--kv-select k=2048,init=128,local=512,cache=0.9,positions=standard|compacted,chunk=512</c> (any subset; <c>on</c> for the
/// defaults) on <c>run</c>, <c>generate</c> and <c>score</c>: TokenSelect KV-cache selection (docs/kv-select.md). Parsed and
/// validated before the model loads; a bad value is a one-line error naming the key.
/// </summary>
internal sealed class KvSelectOption
{
    public Option<string> Option { get; } = new("--kv-select")
    {
        Description = "TokenSelect KV-cache selection: k=2048,init=128,local=512,cache=0.9,positions=standard|compacted,chunk=512 (any subset; 'on' = defaults)",
    };

    public void AddTo(Command command) => command.Options.Add(Option);

    /// <summary>The load options with the parsed selection, or unchanged without the option.</summary>
    public ModelLoadOptions Apply(ParseResult result, ModelLoadOptions options) =>
        result.GetValue(Option) is { } text ? options with { KvSelect = KvSelectOptions.Parse(text) } : options;

    /// <summary>One line of counts after a run with selection (nothing without it).</summary>
    public static void Report(LanguageModel model, TextWriter errors)
    {
        if (model.KvSelectStatistics is { } statistics)
        {
            errors.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[kv-select {model.KvSelectOptions}: {statistics.Selections} selections, {statistics.CacheHits} cache hits ({statistics.HitRate:P1}) over the layer steps long enough to select]"));
        }
    }
}
