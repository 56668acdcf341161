using System.Text.Json;
using KernelLM.Cli;
using KernelLM.Models;
using KernelLM.Models.Evaluation;
using KernelLM.Runtime;
using KernelLM.Runtime.KvSelect;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.KvSelect;

/// <summary>
/// The --kv-select option (parsing, one-line errors before the model loads, the counts line), score with a
/// reference on the same folder (the selection's KL per position), the needle command end to end on the embedded model,
/// and the retrieval harness's prompt generator and scorer.
/// </summary>
[TestFixture]
public sealed class KvSelectCliTests
{
    private static (int ExitCode, string Output, string Errors) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var errors = new StringWriter();
        int exitCode = Program.BuildCommand(output, errors).Parse(args).Invoke();
        return (exitCode, output.ToString(), errors.ToString());
    }

    [Test]
    public void Options_parse_every_key_and_default_the_rest()
    {
        var options = KvSelectOptions.Parse("k=100, init=4,local=8,cache=0.75,positions=standard,chunk=64");
        Assert.That(options, Is.EqualTo(new KvSelectOptions { TopK = 100, Initial = 4, Local = 8, CacheThreshold = 0.75f, Chunk = 64 }));
        Assert.That(KvSelectOptions.Parse("on"), Is.EqualTo(new KvSelectOptions()));
        Assert.That(KvSelectOptions.Parse("k=64"), Is.EqualTo(new KvSelectOptions { TopK = 64 }));
        Assert.That(new KvSelectOptions().ToString(), Is.EqualTo("k=2048,init=128,local=512,cache=0.9,positions=standard,chunk=512"));
        Assert.That(KvSelectOptions.Parse(new KvSelectOptions { TopK = 7 }.ToString()), Is.EqualTo(new KvSelectOptions { TopK = 7 }), "ToString round-trips");
    }

    [TestCase("k=0", "k=0")]
    [TestCase("k=9000", "k=9000")]
    [TestCase("local=0", "local=0")]
    [TestCase("init=-1", "init=-1")]
    [TestCase("cache=1.5", "cache=1.5")]
    [TestCase("k=abc", "k=abc")]
    [TestCase("size=3", "unknown key 'size'")]
    [TestCase("k=1,k=2", "'k' is given twice")]
    [TestCase("k", "not key=value")]
    [TestCase("positions=rotated", "positions=rotated")]
    public void Bad_options_are_one_line_errors_naming_the_key(string text, string expected)
    {
        var error = Assert.Throws<InvalidParameterException>(() => KvSelectOptions.Parse(text))!;
        Assert.That(error.Message, Does.Contain("kv-select").And.Contain(expected));
        var (exitCode, _, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", "Hi", "--kv-select", text, "--device", "cpu");
        Assert.That(exitCode, Is.Not.Zero);
        Assert.That(errors.Trim().Split('\n'), Has.Length.EqualTo(1), errors);
        Assert.That(errors, Does.Contain(expected));
    }

    [TestCase("standard")]
    [TestCase("compacted")]
    public void Generate_with_selection_reports_its_counts(string positions)
    {
        var (exitCode, output, errors) = Run("generate", "--model", TestPaths.TinyStories, "--prompt", "Once upon a time", "--temperature", "0",
            "--max-tokens", "60", "--device", "cpu", "--kv-select", $"k=8,init=2,local=8,cache=0.5,chunk=4,positions={positions}");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.StartWith("Once upon a time"));
        Assert.That(errors, Does.Match(@"\[kv-select k=8,init=2,local=8,cache=0\.5,positions=" + positions + @",chunk=4: \d+ selections, \d+ cache hits \(.*\) over the layer steps long enough to select\]"));
    }

    [Test]
    public void Score_against_the_same_folder_measures_the_selection()
    {
        string text = string.Join(" ", Enumerable.Repeat("The little cat sat on the warm mat and looked at the big red ball.", 6));
        var (exitCode, output, errors) = Run("score", "--model", TestPaths.TinyStories, "--reference", TestPaths.TinyStories, "--text", text, "--json",
            "--device", "cpu", "--kv-select", "k=8,init=2,local=8,cache=1");
        Assert.That(exitCode, Is.Zero, errors);
        var kl = output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(line =>
        {
            using var json = JsonDocument.Parse(line);
            return json.RootElement.GetProperty("kl_pq").GetDouble();
        }).ToArray();
        Assert.That(kl[..17], Is.All.LessThan(1e-6), "positions up to init + k + local attend to everything");
        Assert.That(kl.Skip(20).Max(), Is.GreaterThan(1e-4), "later positions see only a selection");
    }

    [Test]
    public void Needle_runs_any_model_folder_with_and_without_selection()
    {
        var (exitCode, output, errors) = Run("needle", "--model", TestPaths.TinyStories, "--contexts", "300", "--depths", "0.5", "--trials", "1",
            "--device", "cpu", "--kv-select", "k=32,init=4,local=16");
        Assert.That(exitCode, Is.Zero, errors);
        Assert.That(output, Does.Contain("kv-select k=32").And.Match(@"accuracy: full attention \d/1, kv-select \d/1"));
    }

    [Test]
    public void Retrieval_prompts_hold_their_needle_at_the_depth_and_answers_are_scored_by_value()
    {
        var random = new Random(3);
        Func<string, int> words = text => text.Split([' ', '\n'], StringSplitOptions.RemoveEmptyEntries).Length;
        var prompt = KeyValueRetrieval.Create(words, 600, 0.25, random);
        Assert.That(prompt.Tokens, Is.InRange(450, 650));
        Assert.That(prompt.Text.Split('\n').Count(line => line.Contains(prompt.Key, StringComparison.Ordinal)), Is.EqualTo(3), "its pair, the question and the answer line");
        Assert.That(prompt.Text, Does.Contain($"key: {prompt.Key}  value: {prompt.Value}\n"));
        Assert.That(prompt.Depth, Is.EqualTo(0.25).Within(1.0 / prompt.Pairs));
        Assert.That(prompt.Text, Does.EndWith($"the value of key {prompt.Key} is"));
        Assert.That(KeyValueRetrieval.IsCorrect($" {prompt.Value}.", prompt.Value), Is.True);
        Assert.That(KeyValueRetrieval.IsCorrect($" '{prompt.Value}'", prompt.Value), Is.True);
        Assert.That(KeyValueRetrieval.IsCorrect($" {prompt.Value}7", prompt.Value), Is.False);
        Assert.That(KeyValueRetrieval.IsCorrect(" unknown", prompt.Value), Is.False);
    }
}
