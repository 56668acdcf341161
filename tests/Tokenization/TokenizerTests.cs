using KernelLM.Models.Tokenization;
using KernelLM.Runtime;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Tokenization;

/// <summary>Real Llama 3 and Qwen3 tokenizer.json files through Tokenizers.DotNet, and BOS handling.</summary>
[TestFixture]
public sealed class TokenizerTests
{
    private const string Text = "Hello world, this is KernelLM.";
    private static readonly int[] Llama3Ids = [9906, 1917, 11, 420, 374, 37703, 11237, 13];
    private static readonly int[] Qwen3Ids = [9707, 1879, 11, 419, 374, 36603, 10994, 13];

    [Test]
    public void Llama3_tokenizer_encodes_and_decodes()
    {
        // Llama 3's <|begin_of_text|> is 128000; this tokenizer.json's post-processor adds no BOS and its
        // tokenizer_config.json does not ask for one, so none is added (as transformers does).
        using var tokenizer = HfTokenizer.Load(NpmFixtures.Llama3TokenizerDirectory, bosTokenId: 128000, eosTokenIds: [128001]);
        Assert.That(tokenizer.Encode(Text), Is.EqualTo(Llama3Ids));
        Assert.That(tokenizer.Decode(Llama3Ids), Is.EqualTo(Text));
    }

    [Test]
    public void Qwen3_tokenizer_encodes_and_decodes()
    {
        using var tokenizer = HfTokenizer.Load(NpmFixtures.Qwen3TokenizerDirectory, bosTokenId: null, eosTokenIds: [151645]);
        Assert.That(tokenizer.Encode(Text), Is.EqualTo(Qwen3Ids));
        Assert.That(tokenizer.Decode(Qwen3Ids), Is.EqualTo(Text));
    }

    [Test]
    public void Tiny_stories_follows_add_bos_token()
    {
        using var tokenizer = HfTokenizer.Load(TestPaths.TinyStories, bosTokenId: 0, eosTokenIds: [1]);
        Assert.That(tokenizer.AddBos, Is.True);
        Assert.That(tokenizer.Encode("Once upon a time"), Is.EqualTo(new[] { 0, 325, 326, 258, 324 }));
        Assert.That(tokenizer.Encode("Once upon a time", addSpecialTokens: false), Is.EqualTo(new[] { 325, 326, 258, 324 }));
        Assert.That(tokenizer.Decode([0, 325, 326, 1]), Is.EqualTo("Once upon"), "special tokens are skipped");
    }

    [Test]
    public void Bos_is_removed_when_the_config_says_add_bos_token_false()
    {
        string folder = TestPaths.NewTemporaryDirectory("tokenizer");
        try
        {
            File.Copy(Path.Combine(TestPaths.TinyStories, "tokenizer.json"), Path.Combine(folder, "tokenizer.json"));
            File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"), """{ "add_bos_token": false }""");
            using var tokenizer = HfTokenizer.Load(folder, bosTokenId: 0, eosTokenIds: [1]);
            Assert.That(tokenizer.Encode("Once upon a time"), Is.EqualTo(new[] { 325, 326, 258, 324 }));
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Test]
    public void Missing_or_corrupt_tokenizer_is_a_typed_error_naming_the_file()
    {
        string folder = TestPaths.NewTemporaryDirectory("tokenizer");
        try
        {
            Assert.That(() => HfTokenizer.Load(folder, 0, [1]), Throws.TypeOf<ModelConfigException>().With.Message.Contains("tokenizer.json"));
            File.WriteAllText(Path.Combine(folder, "tokenizer.json"), "{ this is not json");
            Assert.That(() => HfTokenizer.Load(folder, 0, [1]), Throws.TypeOf<ModelConfigException>().With.Message.Contains("tokenizer.json"));
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Test]
    public void Vocabulary_reads_the_id_table_and_fingerprints_it()
    {
        using var tokenizer = HfTokenizer.Load(TestPaths.TinyStories, bosTokenId: 0, eosTokenIds: [1]);
        var vocabulary = tokenizer.Vocabulary;
        Assert.That(vocabulary.Size, Is.EqualTo(2048));
        Assert.That(vocabulary[0], Is.EqualTo("<|bos|>"));
        Assert.That(vocabulary[325], Is.EqualTo("Once"));
        Assert.That(vocabulary[2048], Is.Null);
        Assert.That(vocabulary.Fingerprint, Has.Length.EqualTo(64));
        var copy = TokenizerVocabulary.Read(Path.Combine(TestPaths.TinyStories, "tokenizer.json"));
        Assert.That(copy.Fingerprint, Is.EqualTo(vocabulary.Fingerprint));
        Assert.That(copy.FirstDifference(vocabulary), Is.EqualTo(-1));
    }

    [Test]
    public void Vocabulary_reads_unigram_lists_and_added_tokens_and_finds_the_first_difference()
    {
        string folder = TestPaths.NewTemporaryDirectory("vocabulary");
        try
        {
            string a = Path.Combine(folder, "a.json");
            string b = Path.Combine(folder, "b.json");
            File.WriteAllText(a, """{ "model": { "type": "Unigram", "vocab": [["<unk>", 0], ["▁a", -1.5], ["b", -2]] }, "added_tokens": [{ "id": 4, "content": "<x>" }] }""");
            File.WriteAllText(b, """{ "model": { "type": "Unigram", "vocab": [["<unk>", 0], ["▁a", -1.5], ["c", -2]] }, "added_tokens": [{ "id": 4, "content": "<x>" }] }""");
            var first = TokenizerVocabulary.Read(a);
            var second = TokenizerVocabulary.Read(b);
            Assert.That(first.Size, Is.EqualTo(5));
            Assert.That(first[1], Is.EqualTo("\u2581a"));
            Assert.That(first[3], Is.Null, "a gap between the vocabulary and the added tokens");
            Assert.That(first[4], Is.EqualTo("<x>"));
            Assert.That(first.FirstDifference(second), Is.EqualTo(2));
            Assert.That(first.Fingerprint, Is.Not.EqualTo(second.Fingerprint));
            File.WriteAllText(b, """{ "model": { "vocab": 3 } }""");
            Assert.That(() => TokenizerVocabulary.Read(b), Throws.TypeOf<ModelConfigException>().With.Message.Contains("b.json"));
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }
}
