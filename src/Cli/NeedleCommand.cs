using System.CommandLine;
using System.Globalization;
using KernelLM.Models;
using KernelLM.Models.Evaluation;
using KernelLM.Runtime;

namespace KernelLM.Cli;

/// <summary>
/// <c>kernellm needle --model DIR [--contexts 2000,8000] [--depths 0.1,0.5,0.9] [--trials N] [--seed S] [--kv-select ...]</c>:
/// the key-value retrieval harness (<see cref="KeyValueRetrieval"/>) with full attention and, given --kv-select, with
/// TokenSelect on the same prompts; prints one line per prompt and the accuracy of each.
/// </summary>
internal static class NeedleCommand
{
    public static Command Create(TextWriter output, TextWriter errors)
    {
        var model = Program.ModelOption(required: true);
        var contexts = new Option<string>("--contexts") { Description = "Prompt lengths in tokens, comma-separated", DefaultValueFactory = _ => "2000" };
        var depths = new Option<string>("--depths") { Description = "Where the asked pair sits (0 = first, 1 = last), comma-separated", DefaultValueFactory = _ => "0.1,0.5,0.9" };
        var trials = new Option<int>("--trials") { Description = "Prompts per (context, depth)", DefaultValueFactory = _ => 2 };
        var seed = new Option<int>("--seed") { Description = "Seed of the keys and values", DefaultValueFactory = _ => 1 };
        var device = new Program.DeviceOptions();
        var kvSelect = new KvSelectOption();
        var command = new Command("needle", "Key-value retrieval (needle in a haystack): accuracy with full attention and with --kv-select.")
        {
            model, contexts, depths, trials, seed,
        };
        device.AddTo(command);
        kvSelect.AddTo(command);
        command.SetAction(result => Program.Guard(result, errors, () =>
        {
            int[] lengths = Numbers(result.GetValue(contexts)!, "--contexts", int.Parse).ToArray();
            double[] fractions = Numbers(result.GetValue(depths)!, "--depths", double.Parse).ToArray();
            int count = result.GetValue(trials);
            if (lengths.Any(l => l < 16) || fractions.Any(d => !(d >= 0 && d <= 1)) || count < 1)
            {
                throw new InvalidParameterException("--contexts / --depths / --trials", "contexts >= 16 tokens, depths in [0, 1], trials >= 1");
            }
            var loadOptions = device.Read(result);
            if (loadOptions.ContextLength == 0)
            {
                loadOptions = loadOptions with { ContextLength = lengths.Max() + 64 };
            }
            var selected = kvSelect.Apply(result, loadOptions);
            string directory = result.GetValue(model)!;
            var random = new Random(result.GetValue(seed));
            List<RetrievalPrompt> prompts;
            int fullCorrect = 0;
            var fullAnswers = new List<RetrievalAnswer>();
            using (var full = Program.LoadWithProgress(directory, loadOptions, errors))
            {
                prompts = [.. from length in lengths from depth in fractions from _ in Enumerable.Range(0, count)
                              select KeyValueRetrieval.Create(text => full.Encode(text).Length, length, depth, random)];
                foreach (var prompt in prompts)
                {
                    var answer = KeyValueRetrieval.Ask(full, prompt);
                    fullAnswers.Add(answer);
                    fullCorrect += answer.Correct ? 1 : 0;
                }
            }
            var selectedAnswers = new List<RetrievalAnswer>();
            int selectedCorrect = 0;
            if (selected.KvSelect is not null)
            {
                using var withSelection = Program.LoadWithProgress(directory, selected, errors);
                foreach (var prompt in prompts)
                {
                    var answer = KeyValueRetrieval.Ask(withSelection, prompt);
                    selectedAnswers.Add(answer);
                    selectedCorrect += answer.Correct ? 1 : 0;
                }
            }
            output.WriteLine(selected.KvSelect is null ? "tokens  depth  value   full" : $"tokens  depth  value   full  kv-select {selected.KvSelect}");
            for (int i = 0; i < prompts.Count; i++)
            {
                var p = prompts[i];
                string line = string.Create(CultureInfo.InvariantCulture, $"{p.Tokens,6}  {p.Depth,5:F2}  {p.Value}  {Mark(fullAnswers[i])}");
                output.WriteLine(selectedAnswers.Count > 0 ? $"{line}  {Mark(selectedAnswers[i])}" : line);
            }
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"accuracy: full attention {fullCorrect}/{prompts.Count}")
                + (selectedAnswers.Count > 0 ? $", kv-select {selectedCorrect}/{prompts.Count}" : ""));
            return 0;
        }));
        return command;
    }

    private static string Mark(RetrievalAnswer answer) => (answer.Correct ? "ok " : "no ") + Quote(answer.Answer);

    private static string Quote(string text) => "\"" + text.Replace("\n", "\\n", StringComparison.Ordinal).Trim() + "\"";

    private static IEnumerable<T> Numbers<T>(string text, string option, Func<string, IFormatProvider, T> parse)
    {
        foreach (string part in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            T value;
            try
            {
                value = parse(part, CultureInfo.InvariantCulture);
            }
            catch (FormatException)
            {
                throw new InvalidParameterException(option, $"'{part}' is not a number");
            }
            yield return value;
        }
    }
}
