using System.Globalization;
using System.Text;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;

namespace KernelLM.Models.Evaluation;

/// <summary>One key-value retrieval prompt: the text, the queried key, its value, and where the pair sits.</summary>
/// <param name="Depth">The queried pair's place among the pairs, 0 (first) to 1 (last).</param>
public sealed record RetrievalPrompt(string Text, string Key, string Value, int Pairs, double Depth, int Tokens);

/// <summary>One scored answer: what the model wrote and whether it retrieved the value.</summary>
public sealed record RetrievalAnswer(RetrievalPrompt Prompt, string Answer, bool Correct);

/// <summary>
/// A needle-in-a-haystack harness for long contexts (docs/kv-select.md, "Retrieval harness"): a prompt lists random
/// keys with random values (the haystack; every pair is a potential needle), then asks for the value of one of them
/// placed at a chosen depth; the model's greedy continuation is right when it starts with that value. Run any model
/// folder through it with full attention and with TokenSelect to compare their accuracy (<c>kernellm needle</c>).
/// </summary>
public static class KeyValueRetrieval
{
    private const string Preamble = "Below is a list of keys, each with its value. Remember them; a question about one of them follows.\n\n";

    /// <summary>
    /// A prompt of about <paramref name="targetTokens"/> tokens (pairs are added until the tokenized text would pass it)
    /// whose question asks for the pair at <paramref name="depth"/> (0..1). Keys are 8-4 hex groups, values 6 digits,
    /// all distinct, drawn from <paramref name="random"/>.
    /// </summary>
    public static RetrievalPrompt Create(Func<string, int> countTokens, int targetTokens, double depth, Random random)
    {
        ArgumentNullException.ThrowIfNull(countTokens);
        ArgumentNullException.ThrowIfNull(random);
        if (!(depth >= 0 && depth <= 1))
        {
            throw new ArgumentOutOfRangeException(nameof(depth), depth, "depth is a fraction in [0, 1]");
        }
        var keys = new HashSet<string>(StringComparer.Ordinal);
        var pairs = new List<(string Key, string Value)>();
        string Line((string Key, string Value) pair) => $"key: {pair.Key}  value: {pair.Value}\n";
        (string, string) NewPair()
        {
            string key;
            do
            {
                key = $"{random.Next(0x10000):x4}{random.Next(0x10000):x4}-{random.Next(0x10000):x4}";
            }
            while (!keys.Add(key));
            return (key, random.Next(100000, 1000000).ToString(CultureInfo.InvariantCulture));
        }
        // Size the haystack from a small sample: tokens per line vary little.
        string question = Question("00000000-0000");
        int fixedTokens = countTokens(Preamble + question);
        var sample = Enumerable.Range(0, 16).Select(_ => Line(NewPair())).ToArray();
        double perLine = countTokens(string.Concat(sample)) / 16.0;
        int count = Math.Max(1, (int)((targetTokens - fixedTokens) / perLine));
        keys.Clear();
        for (int i = 0; i < count; i++)
        {
            pairs.Add(NewPair());
        }
        int index = (int)Math.Round(depth * (count - 1));
        var (needleKey, needleValue) = pairs[index];
        var text = new StringBuilder(Preamble);
        foreach (var pair in pairs)
        {
            text.Append(Line(pair));
        }
        text.Append('\n').Append(Question(needleKey));
        string prompt = text.ToString();
        return new RetrievalPrompt(prompt, needleKey, needleValue, count, count == 1 ? 0 : (double)index / (count - 1), countTokens(prompt));
    }

    private static string Question(string key) => $"Question: what is the value of key {key}?\nAnswer: the value of key {key} is";

    /// <summary>Right when the answer's first run of digits is the value.</summary>
    public static bool IsCorrect(string answer, string value)
    {
        ArgumentNullException.ThrowIfNull(answer);
        int start = 0;
        while (start < answer.Length && !char.IsAsciiDigit(answer[start]))
        {
            start++;
        }
        int end = start;
        while (end < answer.Length && char.IsAsciiDigit(answer[end]))
        {
            end++;
        }
        return answer[start..end] == value;
    }

    /// <summary>The model's greedy answer (at most 12 tokens, up to a newline) to <paramref name="prompt"/>, scored.</summary>
    public static RetrievalAnswer Ask(LanguageModel model, RetrievalPrompt prompt)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompt);
        var options = new GenerationOptions { MaxNewTokens = 12, Sampling = SamplingOptions.Greedy, StopStrings = ["\n"] };
        string answer = string.Concat(model.Generate(prompt.Text, options).Select(token => token.Text));
        return new RetrievalAnswer(prompt, answer, IsCorrect(answer, prompt.Value));
    }
}
